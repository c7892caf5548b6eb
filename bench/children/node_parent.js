'use strict';
// Node's own fork(), timed by Node itself. Driven by bench/ipc.py over stdin/stdout, one
// command per line, one JSON reply per line (bench/ipc.py starts a fresh one every round and
// sends each command twice: a warm-up, then the timed one):
//   first      -> {"value": ms from fork() to the child's first message}
//   rt K       -> {"value": us per round trip, mean of K sequential round trips}
//   oneway N   -> {"value": messages/s, N sends and a null, then the child's one reply (its count)}
// With FORKIO_BENCH_PYTHON set (a Python executable), the children of rt and oneway are forkio
// children (bench/children/forkio_child.py, JSON mode) instead of Node ones: Node -> forkio.
// stdin closing (or "quit") disconnects every child and exits.
const { fork } = require('child_process');
const path = require('path');
const readline = require('readline');

const PYTHON = process.env.FORKIO_BENCH_PYTHON;
const CHILD = path.join(__dirname, PYTHON ? 'forkio_child.py' : 'node_child.js');
const MSG = { seq: 0, op: 'ping', args: [1, 2, 3], ok: true };
const now = () => process.hrtime.bigint();
const children = new Map();

function started(child) {
  return new Promise((resolve, reject) => {
    child.once('message', () => resolve(child));
    child.once('error', reject);
    child.once('exit', (code, sig) => reject(new Error(`child exited early: ${code} ${sig}`)));
  });
}

async function persistent(mode) {
  const key = mode;
  if (!children.has(key)) {
    const child = PYTHON ? fork(CHILD, [mode], { execPath: PYTHON, execArgv: [], serialization: 'json' })
      : fork(CHILD, [mode]);
    children.set(key, child);
    await started(child);
    child.removeAllListeners('exit');
  }
  return children.get(key);
}

async function first() {
  const t0 = now();
  const child = fork(CHILD, ['first']);
  await new Promise((resolve) => child.once('message', resolve));
  const t1 = now();
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.disconnect();
  await exited;
  return Number(t1 - t0) / 1e6;
}

async function rt(k) {
  const child = await persistent('echo');
  return new Promise((resolve) => {
    let got = 0;
    let t0 = 0n;
    const onMessage = () => {
      if (++got === k) {
        const t1 = now();
        child.off('message', onMessage);
        resolve(Number(t1 - t0) / 1e3 / k);
        return;
      }
      child.send(MSG);
    };
    child.on('message', onMessage);
    t0 = now();
    child.send(MSG);
  });
}

async function oneway(n) {
  const child = await persistent('count');
  return new Promise((resolve, reject) => {
    const t0 = now();
    child.once('message', (count) => {
      const t1 = now();
      if (count !== n) reject(new Error(`child counted ${count}, expected ${n}`));
      else resolve(n / (Number(t1 - t0) / 1e9));
    });
    for (let i = 0; i < n; i++) child.send(MSG);
    child.send(null);
  });
}

function shutdown() {
  for (const child of children.values()) {
    if (child.connected) child.disconnect();
  }
  process.exitCode = 0;
  setTimeout(() => process.exit(0), 2000).unref();
}

const rl = readline.createInterface({ input: process.stdin });
let queue = Promise.resolve();
rl.on('line', (line) => {
  queue = queue.then(async () => {
    const [cmd, arg] = line.trim().split(/\s+/);
    let value;
    if (cmd === 'first') value = await first();
    else if (cmd === 'rt') value = await rt(Number(arg));
    else if (cmd === 'oneway') value = await oneway(Number(arg));
    else if (cmd === 'quit') return shutdown();
    else throw new Error(`unknown command ${line}`);
    process.stdout.write(JSON.stringify({ value }) + '\n');
  }).catch((err) => {
    process.stdout.write(JSON.stringify({ error: String(err && err.stack || err) }) + '\n');
  });
});
rl.on('close', () => queue.then(shutdown));
