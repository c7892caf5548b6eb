'use strict';
// bench/start.py: Node's own fork(), timed by Node. One command per stdin line, one JSON reply:
//   first      -> {"value": ms from fork() to the child's first message}
//   burst N    -> {"value": ms from the first fork() to a message from each of N children}
const { fork } = require('child_process');
const path = require('path');
const readline = require('readline');

const CHILD = path.join(__dirname, 'node_ready.js');
const now = () => process.hrtime.bigint();

function start() {
  const child = fork(CHILD);
  const ready = new Promise((resolve) => child.once('message', resolve));
  return { child, ready };
}

async function stop(children) {
  await Promise.all(children.map((child) => {
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.disconnect();
    return exited;
  }));
}

async function burst(n) {
  const t0 = now();
  const started = [];
  for (let i = 0; i < n; i++) started.push(start());
  await Promise.all(started.map((s) => s.ready));
  const t1 = now();
  await stop(started.map((s) => s.child));
  return Number(t1 - t0) / 1e6;
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', async (line) => {
  const [cmd, arg] = line.trim().split(/\s+/);
  try {
    const value = cmd === 'first' ? await burst(1) : await burst(Number(arg));
    process.stdout.write(JSON.stringify({ value }) + '\n');
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: String(err) }) + '\n');
  }
});
rl.on('close', () => process.exit(0));
