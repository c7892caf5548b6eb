// A Node child: echo messages, and send back any handle it is given.
process.on('message', (m, handle) => {
  if (handle) {
    process.send({got: 'handle', kind: handle.constructor.name, port: handle.address && handle.address().port}, handle);
    return;
  }
  if (m === 'exit') process.exit(3);
  process.send({echo: m});
});
process.send('ready');
