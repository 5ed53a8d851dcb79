'use strict';
// Enqueues one job per user id (read from the file in argv[2], one per line), 1,000 per
// addBulk, with the same guarantees as the engine's jobs: 3 attempts, exponential backoff
// from 2 s, one pending job per user (the user id is the job id), completed jobs removed.
// Prints the count and exits.

const fs = require('node:fs');
const { Queue } = require('bullmq');
const { QUEUE, redisOptions } = require('./common');

async function main() {
  const users = fs.readFileSync(process.argv[2], 'utf8').split('\n').filter(Boolean);
  const queue = new Queue(QUEUE, {
    connection: redisOptions(process.env.REDIS_URL, Number(process.env.QUEUE_DB)),
  });
  const opts = {
    attempts: 3,
    backoff: { type: 'exponential', delay: 2000 },
    removeOnComplete: true,
    removeOnFail: 50,
  };
  for (let i = 0; i < users.length; i += 1000) {
    const chunk = users.slice(i, i + 1000);
    await queue.addBulk(chunk.map((userId) => ({ name: 'prefetch', data: { userId }, opts: { ...opts, jobId: userId } })));
  }
  console.log(`enqueued ${users.length}`);
  await queue.close();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
