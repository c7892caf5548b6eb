// A Node parent for the interop scenarios of tests/test_node.py: fork the forkio script argv[3]
// with the interpreter argv[4], play scenario argv[2] with it, and print what happens as JSON
// lines. The forkio side of each scenario is tests/children/node_interop_child.py.
'use strict';
const cp = require('child_process');
const dgram = require('dgram');
const net = require('net');

const [scenario, script, python] = process.argv.slice(2);
const fs = require('fs');
const out = (x) => process.stdout.write(JSON.stringify(x) + '\n');
// Whether an fd of ours is non-blocking (O_NONBLOCK, octal 04000, in /proc's fdinfo flags).
const nonBlocking = (fd) => (parseInt(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').match(/flags:\s+(\d+)/)[1], 8) & 0o4000) !== 0;
const timer = setTimeout(() => { out({fail: 'timed out'}); process.exit(1); }, 20000);

function fork(options) {
  const child = cp.fork(script, [scenario], {execPath: python, ...options});
  child.on('exit', (code, signal) => { out({exit: code, signal}); clearTimeout(timer); });
  return child;
}

function connectClients(port, n) {
  const clients = [];
  for (let i = 0; i < n; i++) {
    const client = net.connect(port, '127.0.0.1');
    client.on('error', () => {});
    clients.push(client);
  }
  return clients;
}

const scenarios = {
  // The server's sockets go to the child with a key: getConnections() and close() ask the child.
  'socket-list'() {
    const child = fork();
    const server = net.createServer();
    let n = 0;
    let clients = [];
    server.on('connection', (socket) => child.send({cmd: 'new', n: n++}, socket));
    server.listen(0, '127.0.0.1', () => { clients = connectClients(server.address().port, 3); });
    child.on('message', (m) => {
      out({message: m});
      if (m.got === 3) {
        server.getConnections((err, count) => {
          out({count, err: err && err.message});
          child.send({close: 0});
        });
      } else if (m.closed === 0) {
        server.getConnections((err, count) => {
          out({count, err: err && err.message});
          server.close(() => {
            out({serverClosed: true});
            clients.forEach((c) => c.destroy());
            child.disconnect();
          });
          child.send({closeAll: true}); // only once the child has closed them may 'close' come
        });
      }
    });
  },

  // The child does not read its channel until told on stdin; a Node sender holds everything
  // after a handle until the ACK, so 'three' is written only if the child acknowledged alone.
  'ack-without-reading'() {
    const child = fork({stdio: ['pipe', 'inherit', 'inherit', 'ipc']});
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      child.send({n: 'one', port: server.address().port}, server); // net.Server
      child.send({n: 'two', port: server.address().port}, server._handle); // net.Native
      child.send({n: 'three'}, () => {
        out({delivered: 'three'});
        child.stdin.end('read now\n');
      });
    });
    child.on('message', (m) => {
      out({message: m, nodeServerNonBlocking: nonBlocking(server._handle.fd)});
      server.close();
      child.disconnect();
    });
  },

  // Sockets handed over and then disconnect(): Node waits for the child's ACKs before closing.
  'handles-then-disconnect'() {
    const child = fork();
    const server = net.createServer();
    const replies = [];
    let n = 0;
    server.on('connection', (socket) => {
      child.send({n: n}, socket);
      if (++n === 3) {
        child.disconnect();
        server.close();
      }
    });
    server.listen(0, '127.0.0.1', () => {
      connectClients(server.address().port, 3).forEach((client) => {
        let data = '';
        client.on('data', (chunk) => { data += chunk; });
        client.on('close', () => {
          replies.push(data);
          if (replies.length === 3) out({replies: replies.sort()});
        });
      });
    });
  },

  // A UDP socket goes over as dgram.Socket (with its dgramType).
  'dgram'() {
    const child = fork();
    const udp = dgram.createSocket('udp4');
    udp.bind(0, '127.0.0.1', () => child.send({port: udp.address().port}, udp));
    child.on('message', (m) => {
      out({message: m});
      if (m.sent) {
        udp.close(); // the child's copy alone receives the datagram, sent once the child waits
        const sender = dgram.createSocket('udp4');
        sender.send('datagram', m.port, '127.0.0.1', () => sender.close());
      } else {
        child.disconnect();
      }
    });
  },

  // An asyncio child (aparent): messages and a handle in, answers out, then a handle back.
  'async-echo'() {
    const child = fork();
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      child.send({n: 1});
      child.send({n: 2, port: server.address().port}, server);
      child.send({n: 3});
    });
    child.on('message', (m, handle) => {
      out({message: m, handle: handle ? handle.constructor.name : null});
      if (handle) {
        handle.close();
        server.close();
        child.disconnect();
      }
    });
  },

  // serialization 'advanced' is V8's format, which forkio does not speak: iterating must say so.
  'advanced-iter'() {
    const child = fork({serialization: 'advanced', stdio: ['inherit', 'inherit', 'pipe', 'ipc']});
    let stderr = '';
    child.stderr.on('data', (chunk) => { stderr += chunk; });
    child.stderr.on('end', () => out({stderr}));
  },
};

scenarios[scenario]();
