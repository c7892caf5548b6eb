// A Node parent: fork the Python script argv[2] with argv[3] as the interpreter, send jobs,
// pass a listening server as a handle, print what comes back as JSON lines, then disconnect.
const cp = require('child_process');
const net = require('net');
const child = cp.fork(process.argv[2], [], {execPath: process.argv[3]});
const out = (x) => process.stdout.write(JSON.stringify(x) + '\n');
child.on('message', (m, handle) => {
  out({message: m, handle: handle ? handle.constructor.name : null});
  if (m && m.done === 2) {
    const server = net.createServer((c) => { c.end('hi from node'); });
    server.listen(0, '127.0.0.1', () => { child.send({port: server.address().port}, server); });
  }
  if (m && m.served) child.disconnect();
});
child.on('exit', (code, signal) => { out({exit: code, signal: signal}); process.exit(0); });
child.send({job: 1});
child.send({job: 2});
