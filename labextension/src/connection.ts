/**
 * One notebook's link to fednb in its kernel: finds the kernel's `fednb.sidebar` comm
 * target, opens a comm to it, feeds the model, and sends the few requests the panel has.
 *
 * How the link is found: `%load_ext fednb` rings a doorbell (a kernel-opened comm on the
 * target) that this side answers by opening its own comm; a notebook attached to a kernel
 * that loaded fednb earlier (page reload, kernel shared) finds it with a `comm_info`
 * request instead. Nothing here executes code in the kernel to read state.
 */

import type { ISessionContext } from '@jupyterlab/apputils';
import type { Kernel, KernelMessage } from '@jupyterlab/services';
import type { IDisposable } from '@lumino/disposable';

import { FederationModel } from './model.js';
import { COMM_TARGET, encodeRequest, Request } from './protocol.js';

/** How long a stop sent over the comm may go unanswered before a busy kernel is interrupted. */
const STOP_GRACE_MS = 2000;

/**
 * Only the parts of a notebook's session context the bridge uses (tests pass a fake).
 */
export type SessionContextLike = Pick<
  ISessionContext,
  'session' | 'kernelChanged' | 'statusChanged' | 'connectionStatusChanged'
>;

export class KernelBridge implements IDisposable {
  readonly model: FederationModel;

  constructor(
    sessionContext: SessionContextLike,
    model = new FederationModel(),
    options: { stopGraceMs?: number } = {}
  ) {
    this._context = sessionContext;
    this.model = model;
    this._stopGraceMs = options.stopGraceMs ?? STOP_GRACE_MS;
    sessionContext.kernelChanged.connect(this._onKernelChanged, this);
    sessionContext.statusChanged.connect(this._onStatus, this);
    sessionContext.connectionStatusChanged.connect(this._onConnection, this);
    this._attach(sessionContext.session?.kernel ?? null);
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._context.kernelChanged.disconnect(this._onKernelChanged, this);
    this._context.statusChanged.disconnect(this._onStatus, this);
    this._context.connectionStatusChanged.disconnect(this._onConnection, this);
    this._detach(true);
  }

  /** Send one request to the kernel; false (and a note in the model) when there is no link. */
  send(request: Request): boolean {
    const comm = this._comm;
    if (comm === null || comm.isDisposed) {
      this.model.note(request.type, false, 'fednb is not loaded in this kernel');
      return false;
    }
    comm.send(encodeRequest(request));
    return true;
  }

  /**
   * End training after the round in progress.
   *
   * The request goes over the comm. ipykernel 7 handles comm messages while a cell runs (on
   * a subshell, with JupyterLab 4.6), so even a foreground `%fed_train` hears it. Older
   * kernels queue them behind the running cell: if the kernel is busy with a foreground run
   * and no "stopping" comes back in time, interrupt it; the magic turns an interrupt into
   * the same stop.
   */
  async stop(): Promise<void> {
    const run = this.model.run;
    if (!this.model.isTraining || run === null) {
      this.model.note('stop', false, 'nothing is training');
      return;
    }
    if (run.state === 'stopping') {
      return;
    }
    const sent = this.send({ type: 'stop' });
    const kernel = this._kernel;
    if (run.background || kernel === null || kernel.status !== 'busy') {
      return;
    }
    if (sent && (await this._acknowledged(this._stopGraceMs))) {
      return;
    }
    if (this._kernel === kernel && kernel.status === 'busy' && this.model.run?.state === 'training') {
      await kernel.interrupt();
      this.model.note('stop', true, 'interrupted the kernel: training stops after the round in progress');
    }
  }

  private _acknowledged(ms: number): Promise<boolean> {
    return new Promise(resolve => {
      const done = (ok: boolean) => {
        clearTimeout(timer);
        disconnect();
        resolve(ok);
      };
      const disconnect = this.model.connect(() => {
        if (this.model.run?.state !== 'training') {
          done(true);
        }
      });
      const timer = setTimeout(() => done(false), ms);
    });
  }

  // -- following the kernel ---------------------------------------------------------------

  private _onKernelChanged(
    _: unknown,
    change: { newValue: Kernel.IKernelConnection | null }
  ): void {
    this._attach(change.newValue);
  }

  private _onStatus(_: unknown, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      this._comm = null; // JupyterLab disposes a restarted kernel's comms without closing them
      this.model.setLink(status === 'dead' ? 'no-kernel' : 'restarting');
      this._restarting = true;
    } else if (this._restarting && status === 'idle') {
      this._restarting = false;
      this.model.setLink('no-fednb');
      void this._probe();
    }
  }

  private _onConnection(_: unknown, status: Kernel.ConnectionStatus): void {
    if (status === 'connected' && this.model.link !== 'connected') {
      void this._probe();
    }
  }

  private _attach(kernel: Kernel.IKernelConnection | null): void {
    this._detach(false);
    this._kernel = kernel;
    if (kernel === null) {
      this.model.setLink('no-kernel');
      return;
    }
    kernel.registerCommTarget(COMM_TARGET, this._onDoorbell);
    this.model.setLink('no-fednb');
    void this._probe();
  }

  private _detach(closeComm: boolean): void {
    const kernel = this._kernel;
    if (kernel !== null && !kernel.isDisposed) {
      kernel.removeCommTarget(COMM_TARGET, this._onDoorbell);
    }
    const comm = this._comm;
    this._comm = null;
    if (closeComm && comm !== null && !comm.isDisposed && kernel !== null && !kernel.isDisposed) {
      comm.close();
    }
    this._kernel = null;
  }

  /** Ask the kernel whether fednb's target has comms (it was loaded before we attached). */
  private async _probe(): Promise<void> {
    const kernel = this._kernel;
    if (kernel === null || this._comm !== null) {
      return;
    }
    let reply: KernelMessage.ICommInfoReplyMsg;
    try {
      reply = await kernel.requestCommInfo({ target_name: COMM_TARGET });
    } catch (error) {
      return; // the kernel went away or restarted; the next status change probes again
    }
    const content = reply.content;
    if (kernel === this._kernel && content.status === 'ok' && Object.keys(content.comms).length > 0) {
      this._open(kernel);
    }
  }

  /** The doorbell: fednb was just loaded in the kernel. */
  private _onDoorbell = (comm: Kernel.IComm, msg: KernelMessage.ICommOpenMsg): void => {
    const message = this.model.receive(msg.content.data);
    const kernel = this._kernel;
    if (message?.type === 'hello' && kernel !== null) {
      this._open(kernel);
    }
  };

  private _open(kernel: Kernel.IKernelConnection): void {
    if (this._comm !== null && !this._comm.isDisposed) {
      return;
    }
    const comm = kernel.createComm(COMM_TARGET);
    this._comm = comm;
    comm.onMsg = msg => {
      if (this._comm === comm) {
        this.model.receive(msg.content.data);
      }
    };
    comm.onClose = () => {
      if (this._comm === comm) {
        this._comm = null;
        this.model.setLink('no-fednb');
      }
    };
    comm.open({});
  }

  private _context: SessionContextLike;
  private _stopGraceMs: number;
  private _kernel: Kernel.IKernelConnection | null = null;
  private _comm: Kernel.IComm | null = null;
  private _restarting = false;
  private _disposed = false;
}
