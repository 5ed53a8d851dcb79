'use strict';
// What both scripts share: the Redis connection options (from REDIS_URL) and the queue name.

const QUEUE = 'prefetch-peer';

function redisOptions(url, db) {
  const parsed = new URL(url);
  return {
    host: parsed.hostname || '127.0.0.1',
    port: Number(parsed.port || 6379),
    password: parsed.password ? decodeURIComponent(parsed.password) : undefined,
    db,
    maxRetriesPerRequest: null, // BullMQ requires it
  };
}

module.exports = { QUEUE, redisOptions };
