'use strict';
// Node child for bench/ipc.py, forked by node_parent.js (Node's fork) or by forkio.fork().
// Modes: first | echo | count (counts messages until a null, answers with the count).
// Sends 'ready' first; exits when the channel closes.
const mode = process.argv[2];
process.on('disconnect', () => process.exit(0));
if (mode === 'echo') {
  process.on('message', (m) => process.send(m));
} else if (mode === 'count') {
  let count = 0;
  process.on('message', (m) => {
    if (m === null) {
      process.send(count);
      count = 0;
    } else {
      count++;
    }
  });
} else if (mode === 'first') {
  process.on('message', () => {}); // keeps the channel referenced until the parent disconnects
} else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}
process.send('ready');
