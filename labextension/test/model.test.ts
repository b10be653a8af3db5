// The extension's model code, with no browser: `jlpm test` (tsc, then node's own test runner).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  atParties,
  FederationModel,
  formatAgo,
  formatDuration,
  formatMetric
} from '../src/model.js';
import { encodeRequest, parseKernelMessage, ProtocolError } from '../src/protocol.js';

function party(name: string, extra: Record<string, unknown> = {}) {
  return {
    name,
    endpoint: `ipc:///tmp/fednb/${name}`,
    status: 'online',
    examples: 100,
    last_round: null,
    last_seen: 0.5,
    activity: null,
    error: '',
    containment: 'full',
    ...extra
  };
}

function run(extra: Record<string, unknown> = {}) {
  return {
    state: 'training',
    strategy: 'fedavg',
    round: 7,
    rounds: 20,
    rounds_done: 6,
    accuracy: 0.91,
    loss: 0.3,
    elapsed: 12,
    background: false,
    error: null,
    ...extra
  };
}

function snapshot(extra: Record<string, unknown> = {}) {
  return {
    type: 'snapshot',
    version: 1,
    seq: 1,
    federation: { parties: ['a', 'b', 'c', 'd'].map(n => party(n)) },
    run: null,
    approvals: null,
    ...extra
  };
}

function quiet<T>(fn: () => T): T {
  const warn = console.warn;
  console.warn = () => undefined;
  try {
    return fn();
  } finally {
    console.warn = warn;
  }
}

test('a snapshot is parsed into parties, run and approvals', () => {
  const message = parseKernelMessage(snapshot({ run: run() }));
  assert.equal(message.type, 'snapshot');
  if (message.type !== 'snapshot') {
    return;
  }
  assert.equal(message.parties?.length, 4);
  assert.deepEqual(message.parties?.[0], {
    name: 'a',
    endpoint: 'ipc:///tmp/fednb/a',
    status: 'online',
    examples: 100,
    lastRound: null,
    lastSeen: 0.5,
    activity: null,
    error: '',
    containment: 'full'
  });
  assert.equal(message.run?.roundsDone, 6);
  assert.equal(message.approvals, null);
});

test('a party that does not say how it contains code shows as unknown', () => {
  const bare = party('a');
  delete (bare as Record<string, unknown>).containment;
  const message = parseKernelMessage(snapshot({ federation: { parties: [bare] } }));
  assert.equal(message.type === 'snapshot' ? message.parties?.[0].containment : null, 'unknown');
});

test('malformed messages are rejected whole', () => {
  const bad: unknown[] = [
    null,
    [],
    'snapshot',
    { type: 'execute', code: 'import os' },
    snapshot({ version: 2 }),
    snapshot({ seq: -1 }),
    snapshot({ federation: { parties: [party('a', { examples: 'many' })] } }),
    snapshot({ federation: { parties: [party('a', { name: 7 })] } }),
    snapshot({ federation: { parties: 'a,b' } }),
    snapshot({ run: run({ state: 'exploded' }) }),
    snapshot({ run: run({ round: 21 }) }),
    snapshot({ run: run({ accuracy: 'high' }) }),
    snapshot({ approvals: [{ id: '', coordinator: 'x', kind: 'run', code: '', hash: '', age: 1 }] }),
    snapshot({ federation: { parties: [party('a')], population: { parties: 5000, online: 4999, shown: 2 } } }),
    snapshot({ federation: { parties: [party('a')], population: { parties: 5000, online: 6000, shown: 1 } } }),
    snapshot({ federation: { parties: [party('a')], population: 'many' } }),
    { type: 'result', request: 'stop', ok: true }
  ];
  for (const data of bad) {
    assert.throws(() => parseKernelMessage(data), ProtocolError, JSON.stringify(data));
  }
});

test('a population of thousands is counted, its listed parties being the round\'s', () => {
  const model = new FederationModel(() => 0);
  model.receive(
    snapshot({ federation: { parties: [party('party-7')], population: { parties: 10000, online: 9998, shown: 1 } } })
  );
  assert.deepEqual(model.population, { parties: 10000, online: 9998, shown: 1 });
  assert.equal(model.parties?.length, 1);
  assert.equal(model.statusText, `fed: ${(10000).toLocaleString()} parties`);
  model.receive(snapshot({ seq: 2 }));
  assert.equal(model.population, null);
});

test('the status bar says parties and the round in progress, or nothing', () => {
  const model = new FederationModel(() => 0);
  assert.equal(model.statusText, '');
  model.setLink('no-fednb');
  assert.equal(model.statusText, '');
  model.receive(snapshot());
  assert.equal(model.link, 'connected');
  assert.equal(model.statusText, 'fed: 4 parties');
  model.receive(snapshot({ seq: 2, run: run() }));
  assert.equal(model.statusText, 'fed: 4 parties · round 7/20');
  assert.equal(model.runSummary(), 'training · round 7/20');
  model.receive(snapshot({ seq: 3, run: run({ state: 'done', round: 20, rounds_done: 20 }) }));
  assert.equal(model.statusText, 'fed: 4 parties');
  assert.equal(model.runSummary(), 'done · 20/20 rounds');
  model.receive(snapshot({ seq: 4, federation: { parties: [party('solo')] } }));
  assert.equal(model.statusText, 'fed: 1 party');
  model.receive(snapshot({ seq: 5, federation: null }));
  assert.equal(model.statusText, '');
  assert.match(model.emptyMessage ?? '', /No federation/);
});

test('an older snapshot never overwrites a newer one; a bad one changes nothing', () => {
  const model = new FederationModel(() => 0);
  model.receive(snapshot({ seq: 5, run: run({ round: 3 }) }));
  model.receive(snapshot({ seq: 4, run: run({ round: 2 }) }));
  assert.equal(model.run?.round, 3);
  let changes = 0;
  model.connect(() => changes++);
  const result = quiet(() => model.receive(snapshot({ seq: 6, run: run({ state: '??' }) })));
  assert.equal(result, null);
  assert.equal(changes, 0);
  assert.equal(model.run?.round, 3);
});

test('a kernel restart empties the model until fednb speaks again', () => {
  const model = new FederationModel(() => 0);
  model.receive(snapshot({ run: run() }));
  assert.equal(model.isTraining, true);
  model.setLink('restarting');
  assert.equal(model.hasFederation, false);
  assert.equal(model.isTraining, false);
  assert.equal(model.statusText, '');
  assert.match(model.emptyMessage ?? '', /restarting/);
  model.setLink('no-fednb');
  assert.match(model.emptyMessage ?? '', /%load_ext fednb/);
  model.setLink('no-kernel');
  assert.match(model.emptyMessage ?? '', /no kernel/);
});

test('elapsed keeps counting while training; last seen ages from the snapshot', () => {
  let now = 1_000;
  const model = new FederationModel(() => now);
  model.receive(snapshot({ run: run({ elapsed: 10 }) }));
  now += 2_500;
  assert.equal(model.elapsed(), 12.5);
  const first = model.parties?.[0];
  assert.ok(first);
  assert.equal(model.lastSeen(first), 3);
  model.receive(snapshot({ seq: 2, run: run({ state: 'stopped', elapsed: 13 }) }));
  now += 60_000;
  assert.equal(model.elapsed(), 13);
});

test('an approvals-only kernel (a party served with %fed_serve) has content', () => {
  const model = new FederationModel(() => 0);
  model.receive(
    snapshot({
      federation: null,
      approvals: [{ id: 'r1', coordinator: 'alice', kind: 'train', code: 'x = 1', hash: 'ab12', age: 3 }]
    })
  );
  assert.equal(model.emptyMessage, null);
  assert.equal(model.approvals?.[0].id, 'r1');
  assert.equal(model.statusText, '');
});

test('requests are encoded only in the four known shapes', () => {
  assert.deepEqual(encodeRequest({ type: 'stop' }), { type: 'stop' });
  assert.deepEqual(encodeRequest({ type: 'approve', id: 'r1' }), { type: 'approve', id: 'r1' });
  assert.throws(() => encodeRequest({ type: 'deny', id: '' }), ProtocolError);
  assert.throws(() => encodeRequest({ type: 'deny', id: 'x'.repeat(129) }), ProtocolError);
});

test('results are kept until the next one', () => {
  const model = new FederationModel(() => 0);
  model.receive({ type: 'result', request: 'stop', ok: false, message: 'nothing is training' });
  assert.equal(model.lastResult?.message, 'nothing is training');
  model.note('stop', true, 'interrupted');
  assert.equal(model.lastResult?.ok, true);
  // the stop that queued behind the interrupted cell answers late: it must not say 'nothing is training'
  model.receive({ type: 'result', request: 'stop', ok: false, message: 'nothing is training' });
  assert.equal(model.lastResult?.message, 'interrupted');
});

test('a cell runs at the parties as %%fed_run', () => {
  assert.equal(atParties('label_counts(train)'), '%%fed_run\nlabel_counts(train)');
  assert.equal(atParties('%%fed_run --parties a\nx'), '%%fed_run --parties a\nx');
  assert.equal(atParties('%%fed_run\nx'), '%%fed_run\nx');
  assert.equal(atParties('%%fed_model\nmodel = f()'), null);
  assert.equal(atParties('%time x = 1'), '%%fed_run\n%time x = 1');
});

test('durations, ages and metrics read well', () => {
  assert.equal(formatDuration(42.9), '42 s');
  assert.equal(formatDuration(187), '3 min 07 s');
  assert.equal(formatDuration(7500), '2 h 05 min');
  assert.equal(formatDuration(null), '—');
  assert.equal(formatAgo(0.4), 'just now');
  assert.equal(formatAgo(12), '12 s ago');
  assert.equal(formatAgo(300), '5 min ago');
  assert.equal(formatAgo(null), 'never');
  assert.equal(formatMetric(0.912345), '0.9123');
  assert.equal(formatMetric(null), '—');
});
