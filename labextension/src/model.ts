/**
 * What the panel and the status bar show for one notebook's kernel, with no DOM and no
 * JupyterLab in it (so plain `node --test` checks it).
 *
 * The bridge (connection.ts) feeds it kernel messages and connection changes; views read
 * the derived text. Times are the kernel's seconds counted from when a snapshot arrived,
 * so the kernel's and browser's clocks never have to agree.
 */

import {
  IApproval,
  IParty,
  IPopulation,
  IPrivacy,
  IResult,
  IRun,
  ISnapshot,
  KernelMessage,
  parseKernelMessage,
  ProtocolError
} from './protocol.js';

/** Where the notebook's kernel stands with fednb. */
export type Link =
  | 'no-kernel' // the notebook has no kernel (yet)
  | 'no-fednb' // the kernel runs, but `%load_ext fednb` has not been run in it
  | 'connected' // snapshots arrive
  | 'restarting'; // the kernel is restarting: everything it held is gone

export type Listener = () => void;

/** Wall-clock milliseconds; tests pass their own. */
export type Clock = () => number;

export class FederationModel {
  constructor(clock: Clock = () => Date.now()) {
    this._clock = clock;
  }

  get link(): Link {
    return this._link;
  }

  get snapshot(): ISnapshot | null {
    return this._link === 'connected' ? this._snapshot : null;
  }

  get parties(): IParty[] | null {
    return this.snapshot?.parties ?? null;
  }

  /** A population of thousands: the counts, the parties listed being this round's and those not online. */
  get population(): IPopulation | null {
    return this.snapshot?.population ?? null;
  }

  get run(): IRun | null {
    return this.snapshot?.run ?? null;
  }

  get approvals(): IApproval[] | null {
    return this.snapshot?.approvals ?? null;
  }

  /** The answer to the last request (stop, approve, deny), until the next one. */
  get lastResult(): IResult | null {
    return this._lastResult;
  }

  get hasFederation(): boolean {
    return this.parties !== null;
  }

  get isTraining(): boolean {
    const state = this.run?.state;
    return this.hasFederation && (state === 'training' || state === 'stopping');
  }

  /** The message shown instead of the panel's content, or null when there is content. */
  get emptyMessage(): string | null {
    switch (this._link) {
      case 'no-kernel':
        return 'This notebook has no kernel.';
      case 'restarting':
        return 'The kernel is restarting; its federation is gone.';
      case 'no-fednb':
        return 'No federation in this kernel. Run %load_ext fednb, then %fed_sim N or %fed_connect parties.toml.';
      case 'connected':
        if (this._snapshot === null) {
          return 'Connecting to fednb in this kernel…';
        }
        if (!this.hasFederation && this.approvals === null) {
          return 'No federation in this kernel yet. Start one with %fed_sim N or %fed_connect parties.toml.';
        }
        return null;
    }
  }

  /** `fed: 4 parties · round 7/20` while training, `fed: 4 parties` when idle, '' without a federation. */
  get statusText(): string {
    const parties = this.parties;
    if (parties === null) {
      return '';
    }
    const total = this.population?.parties ?? parties.length;
    const count = `fed: ${total.toLocaleString()} ${total === 1 ? 'party' : 'parties'}`;
    const run = this.run;
    if (run !== null && (run.state === 'training' || run.state === 'stopping')) {
      return `${count} · round ${Math.max(run.round, 1)}/${run.rounds}`;
    }
    return count;
  }

  /** Seconds the run has taken: still counting while it trains. */
  elapsed(): number | null {
    const run = this.run;
    if (run === null) {
      return null;
    }
    const live = run.state === 'training' || run.state === 'stopping';
    return run.elapsed + (live ? (this._clock() - this._receivedAt) / 1000 : 0);
  }

  /** Seconds since a party was last heard from, now. */
  lastSeen(party: IParty): number | null {
    return party.lastSeen === null ? null : party.lastSeen + (this._clock() - this._receivedAt) / 1000;
  }

  /** The run's one-line summary: `training · round 3/5`, `stopped after 2/5 rounds`, … */
  runSummary(): string {
    const run = this.run;
    if (run === null) {
      return 'not trained yet';
    }
    switch (run.state) {
      case 'training':
        return `training · round ${Math.max(run.round, 1)}/${run.rounds}`;
      case 'stopping':
        return `stopping after round ${Math.max(run.round, 1)}/${run.rounds}`;
      case 'done':
        return `done · ${run.roundsDone}/${run.rounds} rounds`;
      case 'stopped':
        return `stopped after ${run.roundsDone}/${run.rounds} rounds`;
      case 'error':
        return `failed after ${run.roundsDone}/${run.rounds} rounds`;
    }
  }

  // -- what the bridge tells it -----------------------------------------------------------

  setLink(link: Link): void {
    if (link === this._link) {
      return;
    }
    this._link = link;
    if (link !== 'connected') {
      this._snapshot = null;
      this._lastResult = null;
    }
    this._emit();
  }

  /** Apply one message from the kernel; a malformed one is dropped and reported (returns false). */
  receive(data: unknown): KernelMessage | null {
    let message: KernelMessage;
    try {
      message = parseKernelMessage(data);
    } catch (error) {
      if (error instanceof ProtocolError) {
        console.warn(`fednb: dropped a malformed message from the kernel: ${error.message}`);
        return null;
      }
      throw error;
    }
    if (message.type === 'snapshot') {
      if (this._snapshot !== null && message.seq < this._snapshot.seq) {
        return message; // an older one overtaken by a newer (two comms to one kernel)
      }
      this._snapshot = message;
      this._receivedAt = this._clock();
      this._link = 'connected';
      this._emit();
    } else if (message.type === 'result') {
      if (message.request === 'stop' && !message.ok && this._lastResult?.request === 'stop' && this._lastResult.ok) {
        return message; // a stop queued behind an interrupted cell: training has already stopped
      }
      this._lastResult = message;
      this._emit();
    }
    return message;
  }

  /** Note a request's answer that came from here, not the kernel (e.g. the kernel was interrupted). */
  note(request: string, ok: boolean, message: string): void {
    this._lastResult = { type: 'result', request, ok, message };
    this._emit();
  }

  // -- listeners ---------------------------------------------------------------------------

  connect(listener: Listener): () => void {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  private _emit(): void {
    for (const listener of [...this._listeners]) {
      listener();
    }
  }

  private _clock: Clock;
  private _link: Link = 'no-kernel';
  private _snapshot: ISnapshot | null = null;
  private _receivedAt = 0;
  private _lastResult: IResult | null = null;
  private _listeners = new Set<Listener>();
}

// -- formatting -------------------------------------------------------------------------------

/** `42 s`, `3 min 07 s`, `2 h 05 min`. */
export function formatDuration(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) {
    return '—';
  }
  const s = Math.floor(seconds);
  if (s < 60) {
    return `${s} s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
  }
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')} min`;
}

/** `just now`, `12 s ago`, `4 min ago`, `never`. */
export function formatAgo(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds)) {
    return 'never';
  }
  if (seconds < 2) {
    return 'just now';
  }
  if (seconds < 60) {
    return `${Math.floor(seconds)} s ago`;
  }
  if (seconds < 3600) {
    return `${Math.floor(seconds / 60)} min ago`;
  }
  return `${Math.floor(seconds / 3600)} h ago`;
}

/** An ε with three significant digits and no trailing zeros (`0.412`, `3`), or `?`. */
export function formatEpsilon(value: number | null): string {
  return value === null || !Number.isFinite(value) ? '?' : String(Number(value.toPrecision(3)));
}

/** `ε 1.2 / 3 · 1.8 left`: a party's budget in one line. */
export function formatBudget(privacy: IPrivacy): string {
  const left = privacy.epsilonRemaining === null ? '' : ` · ${formatEpsilon(privacy.epsilonRemaining)} left`;
  return `ε ${formatEpsilon(privacy.epsilonSpent)} / ${formatEpsilon(privacy.epsilonBudget)}${left}`;
}

/** A metric with four significant decimals, or a dash. */
export function formatMetric(value: number | null): string {
  return value === null ? '—' : value.toFixed(4);
}

// -- cells ------------------------------------------------------------------------------------

const RUN_MAGIC = '%%fed_run';

/**
 * The source that runs a cell at the parties: `%%fed_run` + the cell, the cell itself when
 * it is one already, or null when it starts with another cell magic (which `%%fed_run`
 * cannot wrap).
 */
export function atParties(source: string): string | null {
  const first = source.split('\n', 1)[0].trim();
  if (first === RUN_MAGIC || first.startsWith(`${RUN_MAGIC} `)) {
    return source;
  }
  return first.startsWith('%%') ? null : `${RUN_MAGIC}\n${source}`;
}
