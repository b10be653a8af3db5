// The notebook's link to fednb in its kernel, against a fake kernel: how the link is found,
// lost on restart and found again, and how 'Stop training' chooses between a comm message
// and an interrupt.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { KernelBridge, SessionContextLike } from '../src/connection.js';

type Slot = (sender: unknown, args: any) => void;

class FakeSignal {
  connect(slot: Slot, thisArg?: unknown): boolean {
    this.slots.push([slot, thisArg]);
    return true;
  }
  disconnect(slot: Slot, thisArg?: unknown): boolean {
    this.slots = this.slots.filter(([s, t]) => s !== slot || t !== thisArg);
    return true;
  }
  emit(args: unknown): void {
    for (const [slot, thisArg] of [...this.slots]) {
      slot.call(thisArg, null, args);
    }
  }
  slots: [Slot, unknown][] = [];
}

class FakeComm {
  constructor(readonly target: string) {}
  onMsg: ((msg: any) => void) | null = null;
  onClose: ((msg: any) => void) | null = null;
  opened: unknown[] = [];
  sent: unknown[] = [];
  closed = false;
  isDisposed = false;
  open(data: unknown) {
    this.opened.push(data);
  }
  send(data: unknown) {
    this.sent.push(data);
  }
  close() {
    this.closed = true;
  }
  /** A message from the kernel. */
  receive(data: unknown) {
    this.onMsg?.({ content: { data } });
  }
}

class FakeKernel {
  status = 'idle';
  isDisposed = false;
  targets = new Map<string, (comm: unknown, msg: unknown) => void>();
  comms: FakeComm[] = [];
  kernelComms: Record<string, { target_name: string }> = {};
  interrupts = 0;
  registerCommTarget(name: string, callback: (comm: unknown, msg: unknown) => void) {
    this.targets.set(name, callback);
  }
  removeCommTarget(name: string) {
    this.targets.delete(name);
  }
  async requestCommInfo() {
    return { content: { status: 'ok', comms: this.kernelComms } };
  }
  createComm(target: string) {
    const comm = new FakeComm(target);
    this.comms.push(comm);
    return comm;
  }
  async interrupt() {
    this.interrupts += 1;
  }
  /** `%load_ext fednb`: the kernel rings the doorbell. */
  loadFednb() {
    this.kernelComms = { doorbell: { target_name: 'fednb.sidebar' } };
    const doorbell = new FakeComm('fednb.sidebar');
    this.targets.get('fednb.sidebar')?.(doorbell, { content: { data: { type: 'hello', version: 1 } } });
  }
}

function context(kernel: FakeKernel | null) {
  const fake = {
    session: kernel === null ? null : { kernel },
    kernelChanged: new FakeSignal(),
    statusChanged: new FakeSignal(),
    connectionStatusChanged: new FakeSignal()
  };
  return { fake, typed: fake as unknown as SessionContextLike };
}

const tick = () => new Promise(resolve => setTimeout(resolve, 0));

function snapshot(seq: number, run: Record<string, unknown> | null = null) {
  return {
    type: 'snapshot',
    version: 1,
    seq,
    federation: {
      parties: [
        { name: 'a', endpoint: 'ipc://a', status: 'online', examples: 1, last_round: null, last_seen: 0, activity: null, error: '' }
      ]
    },
    run,
    approvals: null
  };
}

function training(extra: Record<string, unknown> = {}) {
  return {
    state: 'training', strategy: 'fedavg', round: 2, rounds: 9, rounds_done: 1, accuracy: null, loss: null,
    elapsed: 1, background: false, error: null, ...extra
  };
}

test('without fednb in the kernel the bridge waits; the doorbell connects it', async () => {
  const kernel = new FakeKernel();
  const { typed } = context(kernel);
  const bridge = new KernelBridge(typed);
  await tick();
  assert.equal(bridge.model.link, 'no-fednb');
  assert.equal(kernel.comms.length, 0, 'opened a comm to a kernel without fednb');
  kernel.loadFednb();
  assert.equal(kernel.comms.length, 1);
  const comm = kernel.comms[0];
  assert.deepEqual(comm.opened, [{}]);
  comm.receive(snapshot(1));
  assert.equal(bridge.model.link, 'connected');
  assert.equal(bridge.model.statusText, 'fed: 1 party');
  comm.onClose?.({}); // %unload_ext fednb
  assert.equal(bridge.model.link, 'no-fednb');
  bridge.dispose();
  assert.equal(kernel.targets.size, 0);
});

test('a bridge that attaches after fednb was loaded finds it with comm_info', async () => {
  const kernel = new FakeKernel();
  kernel.kernelComms = { earlier: { target_name: 'fednb.sidebar' } };
  const bridge = new KernelBridge(context(kernel).typed);
  await tick();
  assert.equal(kernel.comms.length, 1);
  bridge.dispose();
  assert.equal(kernel.comms[0].closed, true, 'its own comm is closed when the notebook goes');
});

test('a restart empties the model; the restarted kernel is probed again', async () => {
  const kernel = new FakeKernel();
  const { fake, typed } = context(kernel);
  const bridge = new KernelBridge(typed);
  kernel.loadFednb();
  kernel.comms[0].receive(snapshot(1));
  fake.statusChanged.emit('restarting');
  assert.equal(bridge.model.link, 'restarting');
  assert.equal(bridge.model.statusText, '');
  kernel.kernelComms = {};
  fake.statusChanged.emit('idle');
  await tick();
  assert.equal(bridge.model.link, 'no-fednb');
  assert.equal(kernel.comms.length, 1, 'opened a comm to the fresh kernel without fednb');
  kernel.loadFednb(); // the user runs %load_ext fednb again
  assert.equal(kernel.comms.length, 2);
  kernel.comms[1].receive(snapshot(1));
  assert.equal(bridge.model.link, 'connected');
});

test('a new kernel for the notebook is followed', async () => {
  const first = new FakeKernel();
  const { fake, typed } = context(first);
  const bridge = new KernelBridge(typed);
  const second = new FakeKernel();
  fake.kernelChanged.emit({ newValue: second });
  assert.equal(first.targets.size, 0);
  assert.equal(second.targets.size, 1);
  fake.kernelChanged.emit({ newValue: null });
  assert.equal(bridge.model.link, 'no-kernel');
});

test('stop: nothing training, a background run, a foreground run that hears the comm', async () => {
  const kernel = new FakeKernel();
  const bridge = new KernelBridge(context(kernel).typed, undefined, { stopGraceMs: 30 });
  kernel.loadFednb();
  const comm = kernel.comms[0];
  comm.receive(snapshot(1));
  await bridge.stop();
  assert.equal(bridge.model.lastResult?.message, 'nothing is training');
  assert.deepEqual(comm.sent, []);

  comm.receive(snapshot(2, training({ background: true })));
  kernel.status = 'busy'; // another cell runs: it must not be interrupted
  await bridge.stop();
  assert.deepEqual(comm.sent, [{ type: 'stop' }]);
  assert.equal(kernel.interrupts, 0);

  comm.receive(snapshot(3, training()));
  const stopping = bridge.stop();
  comm.receive(snapshot(4, training({ state: 'stopping' }))); // the kernel heard it during the cell
  await stopping;
  assert.equal(kernel.interrupts, 0);
  assert.equal(comm.sent.length, 2);
});

test("stop: a busy kernel that cannot hear the comm is interrupted", async () => {
  const kernel = new FakeKernel();
  const bridge = new KernelBridge(context(kernel).typed, undefined, { stopGraceMs: 30 });
  kernel.loadFednb();
  const comm = kernel.comms[0];
  comm.receive(snapshot(1, training()));
  kernel.status = 'busy';
  await bridge.stop();
  assert.deepEqual(comm.sent, [{ type: 'stop' }]);
  assert.equal(kernel.interrupts, 1);
  assert.match(bridge.model.lastResult?.message ?? '', /interrupted the kernel/);
  // the queued stop is answered once the cell has ended: no contradiction shown
  comm.receive({ type: 'result', request: 'stop', ok: false, message: 'nothing is training' });
  assert.match(bridge.model.lastResult?.message ?? '', /interrupted the kernel/);
});

test('requests without a link are refused here, not sent', () => {
  const bridge = new KernelBridge(context(null).typed);
  assert.equal(bridge.model.link, 'no-kernel');
  assert.equal(bridge.send({ type: 'approve', id: 'ab' }), false);
  assert.match(bridge.model.lastResult?.message ?? '', /not loaded/);
});
