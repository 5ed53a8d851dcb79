'use strict';
// One BullMQ worker process doing a prefetch job's unit of work: GET the user's 100-post
// timeline from the sandbox (keep-alive agent), JSON decode, re-encode the cached body, gzip
// at level 1 on libuv's thread pool, SET with a TTL. CONCURRENCY jobs in flight.
//
// Protocol on stdin/stdout, so that the bench measures only the run: after a warm-up of the
// unit of work (WARMUP users, not through the queue) it prints "ready"; on "go" it starts
// consuming; on "stop" it closes and exits.

const http = require('node:http');
const readline = require('node:readline');
const zlib = require('node:zlib');
const { promisify } = require('node:util');
const IORedis = require('ioredis');
const { Worker } = require('bullmq');
const { QUEUE, redisOptions } = require('./common');

const env = process.env;
const concurrency = Number(env.CONCURRENCY || 100);
const timeline = new URL(env.TIMELINE_URL);
const path = env.TIMELINE_PATH || '/api/timeline/user/{userId}';
const ttlMs = 900000;
const gzip = promisify(zlib.gzip);
const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency * 2 });
const store = new IORedis(redisOptions(env.REDIS_URL, Number(env.ENTRIES_DB)));

function fetchTimeline(userId) {
  return new Promise((resolve, reject) => {
    const request = http.get(
      {
        host: timeline.hostname,
        port: timeline.port,
        path: `${path.replace('{userId}', userId)}?limit=100`,
        agent,
        headers: { Authorization: `Bearer ${env.SERVICE_TOKEN}` },
        timeout: 10000,
      },
      (response) => {
        const chunks = [];
        response.on('data', (chunk) => chunks.push(chunk));
        response.on('end', () => {
          if (response.statusCode !== 200) {
            reject(new Error(`timeline answered ${response.statusCode}`));
          } else {
            resolve(Buffer.concat(chunks));
          }
        });
        response.on('error', reject);
      },
    );
    request.on('timeout', () => request.destroy(new Error('timeline timed out')));
    request.on('error', reject);
  });
}

async function prefetch(userId) {
  const page = JSON.parse(await fetchTimeline(userId));
  const fetchedAt = Date.now();
  const body = JSON.stringify({
    success: true,
    data: { posts: page.posts, fetchedAt, postsCount: page.posts.length, tier: 'warm' },
    meta: { cached: true, tier: 'warm', fetchedAt },
  });
  const stored = await gzip(body, { level: 1 });
  await store.set(`peer:warm:${userId}`, stored, 'PX', ttlMs);
}

async function warmUp(count) {
  const users = Array.from({ length: count }, (_, i) => `00000000-0000-4000-8000-${String(process.pid).padStart(6, '0')}${String(i).padStart(6, '0')}`);
  for (let i = 0; i < users.length; i += concurrency) {
    await Promise.all(users.slice(i, i + concurrency).map(prefetch));
  }
}

async function main() {
  const worker = new Worker(QUEUE, async (job) => prefetch(job.data.userId), {
    connection: redisOptions(env.REDIS_URL, Number(env.QUEUE_DB)),
    concurrency,
    autorun: false,
  });
  worker.on('failed', (job, err) => console.error(`job ${job && job.id} failed: ${err.message}`));
  await warmUp(Number(env.WARMUP || 100));
  console.log('ready');
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line === 'go') {
      worker.run().catch((err) => console.error(err));
    } else if (line === 'stop') {
      break;
    }
  }
  await worker.close();
  await store.quit();
  agent.destroy();
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
