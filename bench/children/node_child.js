'use strict';
// Node child for bench/ipc.py, forked by node_parent.js (Node's fork) or by forkio.fork().
// Modes: first | echo | count N. Sends 'ready' first; exits when the channel closes.
const mode = process.argv[2];
const n = Number(process.argv[3] || 0);
process.on('disconnect', () => process.exit(0));
if (mode === 'echo') {
  process.on('message', (m) => process.send(m));
} else if (mode === 'count') {
  let got = 0;
  process.on('message', () => {
    if (++got === n) {
      got = 0;
      process.send(n);
    }
  });
} else if (mode === 'first') {
  process.on('message', () => {}); // keeps the channel referenced until the parent disconnects
} else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}
process.send('ready');
