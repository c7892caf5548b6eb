'use strict';
// bench/start.py: a Node child that says "ready" and exits when its parent disconnects.
process.on('disconnect', () => process.exit(0));
process.on('message', () => {});
process.send('ready');
