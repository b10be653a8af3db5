/**
 * fednb in JupyterLab's shell: the Federation sidebar, three commands and a status-bar item,
 * all following the active notebook's kernel.
 *
 * Also listens for the DOM event `fednb:stop` bubbling out of a notebook (the dashboard
 * widget's Stop button dispatches it) and treats it as 'Stop training' for that notebook;
 * it calls preventDefault() so the dispatcher can tell the extension handled it.
 */

import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, showErrorMessage } from '@jupyterlab/apputils';
import { CodeCell } from '@jupyterlab/cells';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { CommandToolbarButton } from '@jupyterlab/ui-components';
import { DisposableDelegate } from '@lumino/disposable';

import { KernelBridge } from './connection.js';
import { atParties } from './model.js';
import { federationIcon } from './icon.js';
import { FederationPanel } from './panel.js';
import { FederationStatus } from './statusbar.js';

export const STOP_EVENT = 'fednb:stop';

export namespace CommandIDs {
  export const runAtParties = 'fednb:run-cell-at-parties';
  export const stop = 'fednb:stop-training';
  export const showPanel = 'fednb:show-federation-panel';
}

function activate(
  app: JupyterFrontEnd,
  tracker: INotebookTracker,
  palette: ICommandPalette | null,
  statusBar: IStatusBar | null,
  restorer: ILayoutRestorer | null
): void {
  const bridges = new Map<NotebookPanel, KernelBridge>();
  const panel = new FederationPanel();
  panel.title.icon = federationIcon;
  app.shell.add(panel, 'right', { rank: 900 });
  restorer?.add(panel, panel.id);

  const status = new FederationStatus(() => void app.commands.execute(CommandIDs.showPanel));
  statusBar?.registerStatusItem('fednb:status', {
    item: status,
    align: 'left',
    rank: 5,
    isActive: () => status.isActive,
    activeStateChanged: status.activeChanged
  });

  const current = (): KernelBridge | null => {
    const notebook = tracker.currentWidget;
    return notebook === null || notebook.isDisposed ? null : bridgeFor(notebook);
  };

  const commandsChanged = () => {
    for (const id of [CommandIDs.runAtParties, CommandIDs.stop]) {
      app.commands.notifyCommandChanged(id);
    }
  };

  function bridgeFor(notebook: NotebookPanel): KernelBridge {
    const known = bridges.get(notebook);
    if (known !== undefined) {
      return known;
    }
    const created = new KernelBridge(notebook.sessionContext);
    bridges.set(notebook, created);
    created.model.connect(() => {
      if (tracker.currentWidget === notebook) {
        commandsChanged();
      }
    });
    notebook.title.changed.connect(() => {
      if (tracker.currentWidget === notebook) {
        follow(); // renamed: the panel's heading
      }
    });
    const onStop = (event: Event) => {
      event.preventDefault();
      void created.stop();
    };
    notebook.node.addEventListener(STOP_EVENT, onStop);
    notebook.disposed.connect(() => {
      notebook.node.removeEventListener(STOP_EVENT, onStop);
      bridges.delete(notebook);
      created.dispose();
      follow();
    });
    return created;
  }

  function follow(): void {
    const notebook = tracker.currentWidget;
    const bridge = current();
    panel.follow(bridge, notebook?.title.label ?? '');
    status.follow(bridge);
    commandsChanged();
  }

  app.commands.addCommand(CommandIDs.runAtParties, {
    label: 'Run cell at parties',
    caption: 'Run the active cell at every party as %%fed_run; each party’s result shows under the cell',
    icon: federationIcon,
    isEnabled: args =>
      (current()?.model.hasFederation ?? false) &&
      (args['fromContextMenu'] === true || tracker.activeCell?.model.type === 'code'),
    execute: async args => {
      const notebook = tracker.currentWidget;
      if (notebook !== null && args['fromContextMenu'] === true) {
        // the cell that was right-clicked, which need not be the active one
        const hit = app.contextMenuHitTest(node => node.classList.contains('jp-Cell'));
        const index = notebook.content.widgets.findIndex(widget => widget.node === hit);
        if (index >= 0) {
          notebook.content.activeCellIndex = index;
        }
      }
      const cell = notebook?.content.activeCell;
      if (notebook === null || !(cell instanceof CodeCell)) {
        return;
      }
      const source = cell.model.sharedModel.getSource();
      const wrapped = atParties(source);
      if (wrapped === null) {
        await showErrorMessage(
          'Run cell at parties',
          'This cell starts with another cell magic; %%fed_run cannot wrap it.'
        );
        return;
      }
      if (wrapped !== source) {
        cell.model.sharedModel.setSource(wrapped); // the notebook keeps what ran
      }
      await NotebookActions.runCells(notebook.content, [cell], notebook.sessionContext);
    }
  });

  app.commands.addCommand(CommandIDs.stop, {
    label: 'Stop training',
    caption: 'End the federation’s training after the round in progress',
    isEnabled: () => current()?.model.isTraining ?? false,
    execute: async () => {
      await current()?.stop();
    }
  });

  app.commands.addCommand(CommandIDs.showPanel, {
    label: 'Show federation panel',
    execute: () => {
      app.shell.activateById(panel.id);
    }
  });

  for (const command of [CommandIDs.runAtParties, CommandIDs.stop, CommandIDs.showPanel]) {
    palette?.addItem({ command, category: 'Federation' });
  }

  app.contextMenu.addItem({
    command: CommandIDs.runAtParties,
    selector: '.jp-Notebook .jp-CodeCell',
    rank: 0,
    args: { fromContextMenu: true }
  });

  // Only now that the commands exist may the trackers notify them.
  tracker.widgetAdded.connect((_, notebook) => void bridgeFor(notebook));
  tracker.currentChanged.connect(follow);
  tracker.activeCellChanged.connect(commandsChanged);
  follow();

  app.docRegistry.addWidgetExtension('Notebook', {
    createNew: (notebook: NotebookPanel) => {
      const button = new CommandToolbarButton({
        commands: app.commands,
        id: CommandIDs.runAtParties,
        label: ''
      });
      button.addClass('fednb-RunAtParties');
      notebook.toolbar.insertItem(10, 'fednbRunAtParties', button);
      return new DisposableDelegate(() => button.dispose());
    }
  });
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'fednb-labextension:plugin',
  description: 'The Federation sidebar, commands and status-bar item of fednb.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, IStatusBar, ILayoutRestorer],
  activate
};

export default plugin;
