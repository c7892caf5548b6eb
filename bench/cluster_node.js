// Node's cluster with a small supervisor, as bench/cluster.py runs it: node cluster_node.js PORT WORKERS
// Restarts dead workers; SIGHUP: fork a new set, disconnect the old once the new listen;
// SIGTERM: disconnect all (graceful); SIGINT: exit at once (workers die with their IPC channel).
const cluster = require('node:cluster');
const http = require('node:http');
const [port, count] = [Number(process.argv[2]), Number(process.argv[3] || 2)];

if (cluster.isPrimary) {
  let stopping = false;
  const fork = () => cluster.fork();
  for (let i = 0; i < count; i++) fork();
  cluster.on('exit', (worker) => { if (!stopping && !worker.exitedAfterDisconnect) fork(); });
  process.on('SIGHUP', () => {
    const old = Object.values(cluster.workers);
    let ready = 0;
    for (let i = 0; i < count; i++) {
      fork().once('listening', () => { if (++ready === count) old.forEach((w) => w.disconnect()); });
    }
  });
  process.on('SIGTERM', () => { stopping = true; Object.values(cluster.workers).forEach((w) => w.disconnect()); });
  process.on('SIGINT', () => process.exit(0));
} else {
  const server = http.createServer((req, res) => {
    if (req.url.startsWith('/block/')) {
      const until = Date.now() + 1000 * Number(req.url.split('/')[2]);
      while (Date.now() < until) {} // blocks the event loop, on purpose
    }
    res.end(String(process.pid));
  });
  server.keepAliveTimeout = 5000;
  server.listen(port, '127.0.0.1');
}
