// A Node child for the interop scenarios of tests/test_node.py where forkio is the parent.
// Scenario argv[2]; anything meant for the test besides messages goes to stdout, one line each.
'use strict';
const net = require('net');

const scenario = process.argv[2];

const scenarios = {
  // Handles to a parent that is not reading: 'three' is written (and its callback called) only
  // once the parent has acknowledged both handles.
  'ack-without-reading'() {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const port = server.address().port;
      process.send({n: 'one', port}, server); // net.Server
      process.send({n: 'two', port}, server._handle); // net.Native
      process.send({n: 'three'}, () => {
        process.stdout.write('delivered three\n');
        server.close();
      });
    });
  },

  // A server here hands its connections to the parent: getConnections() and close() ask it.
  'socket-list'() {
    const server = net.createServer();
    const clients = [];
    let n = 0;
    server.on('connection', (socket) => process.send({cmd: 'new', n: n++}, socket));
    server.listen(0, '127.0.0.1', () => {
      for (let i = 0; i < 2; i++) {
        const client = net.connect(server.address().port, '127.0.0.1');
        client.on('error', () => {});
        clients.push(client);
      }
    });
    process.on('message', (m) => {
      if (m === 'count') {
        server.getConnections((err, count) => process.send({count, err: err && err.message}));
      } else if (m === 'close') {
        server.close(() => {
          process.send({serverClosed: true});
          clients.forEach((c) => c.destroy());
          process.disconnect();
        });
        process.send({closing: true});
      }
    });
  },

  // Sockets arrive, each is answered and closed; the parent disconnects right after sending.
  'take-sockets'() {
    process.on('message', (m, socket) => socket.end(`hello ${m.n}`));
  },

  // UDP sockets arrive as dgram.Socket (which needs the dgramType).
  'take-dgram'() {
    process.on('message', (m, socket) => {
      process.send({type: socket.type, port: socket.address().port, family: socket.address().family});
      socket.close();
    });
  },
};

scenarios[scenario]();
