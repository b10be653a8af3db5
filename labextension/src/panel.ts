/**
 * The 'Federation' sidebar: the active notebook's parties, training run and, when its
 * kernel serves a party with `%fed_serve`, the requests waiting for approval.
 *
 * Plain DOM, built with textContent only (party names and code come from the network).
 * Each section is rebuilt only when its own data changes, so a button is never replaced
 * under the pointer; a one-second ticker updates the times in place.
 */

import { Widget } from '@lumino/widgets';

import { KernelBridge } from './connection.js';
import { formatAgo, formatBudget, formatDuration, formatEpsilon, formatMetric } from './model.js';
import { IApproval, IParty, IPopulation, IPrivacy, IResult } from './protocol.js';

/** What each containment level means, for the tooltip. */
const CONTAINMENT: Record<string, string> = {
  full: 'coordinator code runs with no network and sees nothing but its datasets',
  weak: 'coordinator code runs with limits only: it could reach the network and the party\'s files',
  none: 'a simulation: coordinator code runs in the party process itself'
};

type Attrs = Record<string, string>;

function h(tag: string, attrs: Attrs = {}, ...children: (Node | string)[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'class') {
      el.className = value;
    } else {
      el.setAttribute(key, value);
    }
  }
  for (const child of children) {
    el.append(child);
  }
  return el;
}

/** A party's privacy budget: one line and a meter of ε spent (the browser draws the meter). */
function budget(party: string, privacy: IPrivacy | undefined): HTMLElement | string {
  if (privacy === undefined) {
    return '';
  }
  const spent = privacy.epsilonSpent ?? 0;
  const meter = h('meter', {
    class: 'fednb-Panel-budgetMeter',
    min: '0',
    max: String(privacy.epsilonBudget),
    value: String(Math.min(spent, privacy.epsilonBudget)),
    low: String(0.5 * privacy.epsilonBudget),
    high: String(0.9 * privacy.epsilonBudget),
    optimum: '0'
  });
  const delta = privacy.delta === null ? '' : ` at δ = ${privacy.delta.toExponential()}`;
  return h(
    'div',
    {
      class: 'fednb-Panel-budget',
      'data-party': party,
      title:
        `privacy budget: ε ${formatEpsilon(privacy.epsilonSpent)} spent of ${formatEpsilon(privacy.epsilonBudget)}` +
        `${delta}; ${privacy.charges} charge(s)`
    },
    h('span', { class: 'fednb-Panel-budgetText' }, formatBudget(privacy)),
    ' ',
    meter
  );
}

export class FederationPanel extends Widget {
  constructor() {
    super();
    this.id = 'fednb-federation-panel';
    this.addClass('fednb-Panel');
    this.title.caption = 'Federation';
    this._heading = h('div', { class: 'fednb-Panel-notebook' });
    this._empty = h('div', { class: 'fednb-Panel-empty' });
    this._parties = h('section', { class: 'fednb-Panel-parties' });
    this._run = h('section', { class: 'fednb-Panel-run' });
    this._approvals = h('section', { class: 'fednb-Panel-approvals' });
    this._result = h('div', { class: 'fednb-Panel-result', role: 'status' });
    this.node.append(
      h('header', { class: 'fednb-Panel-header' }, h('h2', {}, 'Federation'), this._heading),
      this._empty,
      this._parties,
      this._run,
      this._approvals,
      this._result
    );
    this._render();
  }

  /** Show the federation of this notebook's kernel (null: no notebook). */
  follow(bridge: KernelBridge | null, notebook: string): void {
    this._heading.textContent = notebook;
    if (bridge === this._bridge) {
      return; // the same notebook (renamed, or focused again): nothing to rebuild
    }
    if (this._disconnect !== null) {
      this._disconnect();
      this._disconnect = null;
    }
    this._bridge = bridge;
    this._keys = {};
    if (bridge !== null) {
      this._disconnect = bridge.model.connect(() => this._render());
    }
    this._render();
  }

  dispose(): void {
    this.follow(null, '');
    window.clearInterval(this._ticker);
    super.dispose();
  }

  protected onAfterShow(): void {
    this._ticker = window.setInterval(() => this._tick(), 1000);
    this._render();
  }

  protected onBeforeHide(): void {
    window.clearInterval(this._ticker);
  }

  private _render(): void {
    const model = this._bridge?.model ?? null;
    const empty = model === null ? 'Open a notebook to see its federation.' : model.emptyMessage;
    this._empty.textContent = empty ?? '';
    this._empty.hidden = empty === null;
    this.node.dataset.state = empty === null ? 'connected' : model?.link ?? 'no-notebook';
    const result = model?.lastResult ?? null;
    if (result !== this._shownResult) {
      this._shownResult = result;
      if (result !== null && !result.ok && (result.request === 'approve' || result.request === 'deny')) {
        delete this._keys['approvals']; // rebuild: the clicked button is enabled again
      }
    }
    const parties = empty === null ? model?.parties ?? null : null;
    const run = empty === null ? model?.run ?? null : null;
    const approvals = empty === null ? model?.approvals ?? null : null;
    // The keys leave out the times, which the ticker updates in place.
    const partiesKey = parties?.map(party => ({ ...party, lastSeen: null })) ?? null;
    const runKey = parties === null ? null : run === null ? 'none' : { ...run, elapsed: 0 };
    const approvalsKey = approvals?.map(item => ({ ...item, age: null })) ?? null;
    const population = empty === null ? model?.population ?? null : null;
    this._section(this._parties, 'parties', { partiesKey, population }, () =>
      this._renderParties(parties ?? [], population)
    );
    this._section(this._run, 'run', runKey, () => this._renderRun());
    this._section(this._approvals, 'approvals', approvalsKey, () => this._renderApprovals(approvals ?? []));
    this._result.textContent = result?.message ?? '';
    this._result.dataset.ok = result === null ? '' : String(result.ok);
    this._tick();
  }

  /** Rebuild one section only when its data changed; hide it when there is none. */
  private _section(el: HTMLElement, name: string, data: unknown, build: () => (Node | string)[]): void {
    const key = data === null ? '' : JSON.stringify(data);
    el.hidden = data === null;
    if (this._keys[name] === key) {
      return;
    }
    this._keys[name] = key;
    el.replaceChildren(...(data === null ? [] : build()));
  }

  private _renderParties(parties: IParty[], population: IPopulation | null): (Node | string)[] {
    const online = parties.filter(p => p.status === 'online').length;
    const items = parties.map(party =>
      h(
        'li',
        { 'data-party': party.name, 'data-status': party.status },
        h(
          'div',
          { class: 'fednb-Panel-line' },
          h('span', { class: 'fednb-Panel-dot' }),
          h('span', { class: 'fednb-Panel-name', title: party.name }, party.name),
          h('span', { class: 'fednb-Panel-examples' }, party.examples === null ? '' : `${party.examples} examples`)
        ),
        h(
          'div',
          { class: 'fednb-Panel-line' },
          h('span', { class: 'fednb-Panel-status' }, party.activity ? `${party.status} · ${party.activity}` : party.status),
          h('span', { class: 'fednb-Panel-seen', 'data-seen': party.name, title: 'last heard from' })
        ),
        h('div', { class: 'fednb-Panel-endpoint', title: party.endpoint }, party.endpoint),
        h(
          'div',
          {
            class: 'fednb-Panel-containment',
            'data-containment': party.containment,
            title: CONTAINMENT[party.containment] ?? 'the party did not say how it contains coordinator code'
          },
          `containment: ${party.containment}`
        ),
        budget(party.name, party.privacy),
        party.error ? h('div', { class: 'fednb-Panel-error', title: party.error }, party.error) : ''
      )
    );
    if (population !== null) {
      // thousands of parties: the counts, and only the parties of this round or not online
      const heading = `Parties (${population.online.toLocaleString()}/${population.parties.toLocaleString()} online)`;
      const note = `showing ${population.shown}: this round's and those not online`;
      return [
        h('h3', { 'data-population': String(population.parties) }, heading),
        h('div', { class: 'fednb-Panel-note' }, note),
        h('ul', { class: 'fednb-Panel-partyList' }, ...items)
      ];
    }
    return [h('h3', {}, `Parties (${online}/${parties.length} online)`), h('ul', { class: 'fednb-Panel-partyList' }, ...items)];
  }

  private _renderRun(): (Node | string)[] {
    const bridge = this._bridge;
    const model = bridge?.model;
    const run = model?.run ?? null;
    if (bridge === null || model === undefined) {
      return [];
    }
    const field = (label: string, value: string, attrs: Attrs = {}) => [h('dt', {}, label), h('dd', attrs, value)];
    const content: (Node | string)[] = [h('h3', {}, 'Training')];
    if (run === null) {
      content.push(h('p', { class: 'fednb-Panel-idle' }, 'Not trained yet: %fed_train --rounds N'));
      return content;
    }
    content.push(
      h('p', { class: 'fednb-Panel-summary', 'data-run-state': run.state }, model.runSummary()),
      h(
        'dl',
        {},
        ...field('Strategy', run.strategy),
        ...field('Round', `${run.round}/${run.rounds}`, { class: 'fednb-Panel-round' }),
        ...field('Accuracy', formatMetric(run.accuracy), { class: 'fednb-Panel-accuracy' }),
        ...field('Loss', formatMetric(run.loss), { class: 'fednb-Panel-loss' }),
        ...field('Elapsed', '', { class: 'fednb-Panel-elapsed' }),
        ...(run.secure
          ? field('Aggregation', `secure · ${run.secure}`, {
              class: 'fednb-Panel-secure',
              title: "the coordinator saw only the sum of these parties' updates"
            })
          : [])
      )
    );
    if (run.error) {
      content.push(h('p', { class: 'fednb-Panel-error' }, run.error));
    }
    if (run.state === 'training' || run.state === 'stopping') {
      const stop = h('button', { class: 'jp-mod-styled fednb-Panel-stop', type: 'button' }, 'Stop training');
      (stop as HTMLButtonElement).disabled = run.state === 'stopping';
      stop.addEventListener('click', () => void bridge.stop());
      content.push(stop);
    }
    return content;
  }

  private _renderApprovals(approvals: IApproval[]): (Node | string)[] {
    const bridge = this._bridge;
    const items = approvals.map(item => {
      const button = (label: string, type: 'approve' | 'deny', cls: string) => {
        const el = h('button', { class: `jp-mod-styled ${cls}`, type: 'button', 'data-request': item.id }, label);
        el.addEventListener('click', () => {
          (el as HTMLButtonElement).disabled = true;
          bridge?.send({ type, id: item.id });
        });
        return el;
      };
      return h(
        'li',
        { 'data-request': item.id },
        h('div', { class: 'fednb-Panel-request' }, `${item.kind} from ${item.coordinator}`),
        h('div', { class: 'fednb-Panel-hash', title: item.hash }, item.hash.slice(0, 16)),
        h('pre', { class: 'fednb-Panel-code' }, item.code),
        item.returns ? h('div', { class: 'fednb-Panel-returns' }, `Returns ${item.returns}`) : '',
        h(
          'div',
          { class: 'fednb-Panel-actions' },
          button('Approve', 'approve', 'jp-mod-accept fednb-Panel-approve'),
          button('Deny', 'deny', 'jp-mod-warn fednb-Panel-deny')
        )
      );
    });
    return [
      h('h3', {}, `Approval requests (${approvals.length})`),
      approvals.length === 0 ? h('p', { class: 'fednb-Panel-idle' }, 'Nothing is waiting for approval.') : h('ul', {}, ...items)
    ];
  }

  /** Update the times in place. */
  private _tick(): void {
    const model = this._bridge?.model;
    if (model === undefined) {
      return;
    }
    const elapsed = this._run.querySelector('.fednb-Panel-elapsed');
    if (elapsed !== null) {
      elapsed.textContent = formatDuration(model.elapsed());
    }
    for (const party of model.parties ?? []) {
      const cell = this._parties.querySelector(`[data-seen="${CSS.escape(party.name)}"]`);
      if (cell !== null) {
        cell.textContent = formatAgo(model.lastSeen(party));
      }
    }
  }

  private _bridge: KernelBridge | null = null;
  private _disconnect: (() => void) | null = null;
  private _keys: Record<string, string> = {};
  private _shownResult: IResult | null = null;
  private _ticker = 0;
  private _heading: HTMLElement;
  private _empty: HTMLElement;
  private _parties: HTMLElement;
  private _run: HTMLElement;
  private _approvals: HTMLElement;
  private _result: HTMLElement;
}
