/**
 * amp_magics in JupyterLab's status bar: "GPU 43% · 12.1/80 GiB" (or "no GPU" and the CPU's
 * memory), a tooltip with every GPU and the running AMP runs, and a click that opens a panel
 * with %gpu_status's table and each kernel's runs. It polls the server extension's
 * `api/amp_magics/v1/status` (the amp_magics.lab Python package): not while the page is
 * hidden, and less often while the server does not answer.
 */
import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { MainAreaWidget } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Poll } from '@lumino/polling';
import { Widget } from '@lumino/widgets';

const PLUGIN_ID = 'amp-magics:plugin';
const GIB = 1024 ** 3;

export interface IGpu {
  index: number;
  name: string;
  utilization: number | null;
  memory_used: number | null;
  memory_total: number | null;
  temperature: number | null;
  power_draw: number | null;
  power_limit: number | null;
}

export interface IRun {
  name: string;
  status: string;
  step: number;
  total_steps: number | null;
  loss: number | string | null; // "nan", "inf" for a diverged run (JSON has no NaN)
  precision?: string;
  device?: string;
}

export interface IStatus {
  version: number;
  taken_at: number;
  gpus: IGpu[];
  no_gpu_reason: string | null;
  host: {
    cpu_model: string;
    logical_cpus: number | null;
    load_1min: number | null;
    ram_total: number | null;
    ram_available: number | null;
  };
  kernels: { id: string; runs: IRun[] }[];
  html: string;
}

function gib(bytes: number): string {
  return (bytes / GIB).toFixed(bytes >= 100 * GIB ? 0 : 1);
}

function running(status: IStatus): IRun[] {
  return status.kernels.flatMap(k => k.runs.filter(r => r.status === 'running'));
}

/** The item's text: "GPU 43% · 12.1/80 GiB", "2 GPUs 40% · 24.2/160 GiB" or the CPU's. */
export function summary(status: IStatus): string {
  const gpus = status.gpus;
  let text: string;
  if (gpus.length === 0) {
    const { ram_total, ram_available } = status.host;
    text =
      ram_total !== null && ram_available !== null
        ? `no GPU · RAM ${gib(ram_total - ram_available)}/${gib(ram_total)} GiB`
        : 'no GPU';
  } else {
    const known = gpus.filter(g => g.utilization !== null);
    const busy = known.length
      ? Math.round(known.reduce((a, g) => a + (g.utilization as number), 0) / known.length)
      : null;
    const used = gpus.reduce((a, g) => a + (g.memory_used ?? 0), 0);
    const total = gpus.reduce((a, g) => a + (g.memory_total ?? 0), 0);
    const label = gpus.length === 1 ? 'GPU' : `${gpus.length} GPUs`;
    text = `${label}${busy === null ? '' : ` ${busy}%`} · ${gib(used)}/${gib(total)} GiB`;
  }
  const runs = running(status).length;
  return runs ? `${text} · ${runs} AMP run${runs === 1 ? '' : 's'}` : text;
}

function runLine(run: IRun): string {
  const total = run.total_steps ? `/${run.total_steps}` : '';
  const loss =
    run.loss === null
      ? ''
      : `, loss ${typeof run.loss === 'number' ? run.loss.toPrecision(4) : run.loss}`;
  return `${run.name}: step ${run.step}${total}${loss} (${run.status})`;
}

/** The tooltip: every GPU in a line, then the running runs. */
export function tooltip(status: IStatus): string {
  const lines = status.gpus.map(g => {
    const parts = [
      g.utilization === null ? null : `${g.utilization}%`,
      g.memory_total === null ? null : `${gib(g.memory_used ?? 0)}/${gib(g.memory_total)} GiB`,
      g.temperature === null ? null : `${g.temperature} °C`,
      g.power_draw === null
        ? null
        : `${Math.round(g.power_draw)}${g.power_limit ? `/${Math.round(g.power_limit)}` : ''} W`
    ].filter(p => p !== null);
    return `GPU ${g.index} ${g.name}: ${parts.join(', ')}`;
  });
  if (status.gpus.length === 0) {
    lines.push(`no GPU: ${status.no_gpu_reason ?? 'none found'}`);
  }
  lines.push(...running(status).map(runLine));
  return lines.join('\n');
}

class StatusItem extends Widget {
  constructor() {
    super({ node: document.createElement('div') });
    this.addClass('amp-magics-status');
    this.node.textContent = 'GPU …';
    this.node.title = 'amp_magics: reading the GPU status';
  }

  show_(status: IStatus): void {
    this.node.textContent = summary(status);
    this.node.title = tooltip(status);
  }

  fail(reason: string): void {
    this.node.textContent = 'GPU ?';
    this.node.title = `amp_magics: the status cannot be read (${reason})`;
  }
}

/** The panel a click opens: %gpu_status's table (drawn by the server, every value escaped
 * there) and each kernel's runs, written here as text. */
class StatusPanel extends Widget {
  private table = document.createElement('div');
  private runs = document.createElement('div');

  constructor() {
    super();
    this.addClass('amp-magics-panel');
    this.node.append(this.table, this.runs);
  }

  show_(status: IStatus): void {
    this.table.innerHTML = status.html;
    const heading = document.createElement('h3');
    heading.textContent = 'AMP runs';
    const list = document.createElement('ul');
    for (const kernel of status.kernels) {
      for (const run of kernel.runs) {
        const item = document.createElement('li');
        item.textContent = `${runLine(run)} · kernel ${kernel.id.slice(0, 8)}`;
        list.append(item);
      }
    }
    if (!list.children.length) {
      const item = document.createElement('li');
      item.textContent = 'no %%amp_train run in this server’s kernels';
      list.append(item);
    }
    this.runs.replaceChildren(heading, list);
  }
}

export async function fetchStatus(
  settings: ServerConnection.ISettings
): Promise<IStatus> {
  const url = URLExt.join(settings.baseUrl, 'api', 'amp_magics', 'v1', 'status');
  const response = await ServerConnection.makeRequest(url, {}, settings);
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response);
  }
  return (await response.json()) as IStatus;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'GPU and AMP-run status in the status bar',
  autoStart: true,
  requires: [IStatusBar],
  optional: [ISettingRegistry],
  activate: async (
    app: JupyterFrontEnd,
    statusBar: IStatusBar,
    settingRegistry: ISettingRegistry | null
  ) => {
    const item = new StatusItem();
    const panel = new StatusPanel();
    let shell: MainAreaWidget<StatusPanel> | null = null;
    let last: IStatus | null = null;
    let hideWithoutGpu = false;
    let interval = 2000;

    const render = () => {
      if (last === null) {
        return;
      }
      item.show_(last);
      panel.show_(last);
      item.setHidden(hideWithoutGpu && last.gpus.length === 0);
    };
    item.node.addEventListener('click', () => {
      if (shell === null || shell.isDisposed) {
        shell = new MainAreaWidget({ content: panel });
        shell.id = 'amp-magics-status-panel';
        shell.title.label = 'GPU status';
        shell.title.closable = true;
        shell.disposed.connect(() => {
          // the panel lives on for the next click
          panel.parent = null;
        });
        app.shell.add(shell, 'main');
      }
      app.shell.activateById(shell.id);
    });
    statusBar.registerStatusItem('amp-magics:status', {
      item,
      align: 'left',
      rank: 100
    });

    const poll = new Poll({
      factory: async () => {
        try {
          last = await fetchStatus(app.serviceManager.serverSettings);
        } catch (error) {
          item.fail(String(error));
          throw error; // the poll backs off while the server does not answer
        }
        render();
      },
      frequency: { interval, backoff: true, max: 60 * 1000 },
      name: 'amp-magics:status',
      standby: 'when-hidden'
    });

    if (settingRegistry) {
      const settings = await settingRegistry.load(PLUGIN_ID);
      const apply = () => {
        interval = 1000 * (settings.get('pollInterval').composite as number);
        hideWithoutGpu = settings.get('hideWhenNoGpu').composite as boolean;
        poll.frequency = { interval, backoff: true, max: 60 * 1000 };
        render();
      };
      apply();
      settings.changed.connect(apply);
    }
    void poll.start();
  }
};

export default plugin;
