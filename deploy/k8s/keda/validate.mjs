// Validate KEDA resources against KEDA's CRD schemas (the compiled validators that
// @kubernetes-models/keda generates from them). Reads a JSON array of {file, doc} on stdin,
// prints one line per problem, exits 1 if there is any. Run by deploy/k8s/validate.py.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ScaledJob } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledJob";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";

const MODELS = { ScaledObject, ScaledJob, TriggerAuthentication };
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const items = JSON.parse(Buffer.concat(chunks).toString("utf8"));
let problems = 0;
for (const { file, doc } of items) {
  const Model = MODELS[doc.kind];
  if (!Model || doc.apiVersion !== "keda.sh/v1alpha1") {
    console.log(`${file}: no KEDA schema for ${doc.apiVersion} ${doc.kind}`);
    problems++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`${file}: ${doc.kind} ${doc.metadata?.name}: valid (KEDA schema)`);
  } catch (error) {
    console.log(`${file}: ${doc.kind} ${doc.metadata?.name}: ${error.message}`);
    problems++;
  }
}
process.exit(problems ? 1 : 0);
