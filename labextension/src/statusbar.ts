/**
 * The status-bar item: `fed: 4 parties · round 7/20` while training, `fed: 4 parties`
 * when idle, and nothing at all when the active notebook's kernel has no federation.
 */

import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { KernelBridge } from './connection.js';

export class FederationStatus extends Widget {
  constructor(onClick: () => void) {
    super({ node: document.createElement('div') });
    this.addClass('fednb-Status');
    this.node.title = 'Show the federation panel';
    this.node.addEventListener('click', onClick);
  }

  /** Emitted when the item appears or disappears. */
  get activeChanged(): ISignal<this, void> {
    return this._activeChanged;
  }

  get isActive(): boolean {
    return this.node.textContent !== '';
  }

  follow(bridge: KernelBridge | null): void {
    if (bridge === this._bridge) {
      return;
    }
    this._disconnect?.();
    this._disconnect = null;
    this._bridge = bridge;
    if (bridge !== null) {
      this._disconnect = bridge.model.connect(() => this._update());
    }
    this._update();
  }

  dispose(): void {
    this.follow(null);
    super.dispose();
  }

  private _update(): void {
    const wasActive = this.isActive;
    this.node.textContent = this._bridge?.model.statusText ?? '';
    if (wasActive !== this.isActive) {
      this._activeChanged.emit();
    }
  }

  private _bridge: KernelBridge | null = null;
  private _disconnect: (() => void) | null = null;
  private _activeChanged = new Signal<this, void>(this);
}
