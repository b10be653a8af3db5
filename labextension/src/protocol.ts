/**
 * The messages between the kernel's `fednb.notebook.sidebar` bridge and the panel.
 *
 * Kernel → panel: `hello` (the doorbell comm: fednb was loaded), `snapshot` (the whole
 * state, sent throttled after every change) and `result` (the answer to one request).
 * Panel → kernel: `refresh`, `stop`, `approve` and `deny`; nothing else, and never code.
 * Everything that arrives is checked here before the panel renders it: a malformed
 * message is dropped with a console warning, never half-applied.
 */

export const COMM_TARGET = 'fednb.sidebar';
export const PROTOCOL_VERSION = 1;

/** A party's privacy budget: the ε its training data has spent, of what its owner allows. */
export interface IPrivacy {
  epsilonSpent: number | null;
  epsilonBudget: number;
  epsilonRemaining: number | null;
  delta: number | null;
  /** How many accounted requests the party's ledger holds (of those it reports). */
  charges: number;
}

export interface IParty {
  name: string;
  endpoint: string;
  status: string;
  examples: number | null;
  lastRound: number | null;
  /** Seconds between the party last being heard from and the snapshot. */
  lastSeen: number | null;
  /** Its part in the round in progress: training, done, dropped or late. */
  activity: string | null;
  error: string;
  /** How the party contains coordinator code: full, weak, none (a simulation) or unknown. */
  containment: string;
  /** Its privacy budget; absent for a party without one. */
  privacy?: IPrivacy;
}

export type RunState = 'training' | 'stopping' | 'done' | 'stopped' | 'error';

export interface IRun {
  state: RunState;
  strategy: string;
  /** The round in progress (or the last one), counted within this run. */
  round: number;
  rounds: number;
  roundsDone: number;
  accuracy: number | null;
  loss: number | null;
  /** Seconds since the run started, at the time of the snapshot. */
  elapsed: number;
  background: boolean;
  error: string | null;
  /** Under secure aggregation, what the coordinator saw of the last round: "sum of N parties". */
  secure: string | null;
}

export interface IApproval {
  id: string;
  coordinator: string;
  kind: string;
  code: string;
  /** What the request would return, in the owner's words. */
  returns: string;
  hash: string;
  age: number | null;
}

/** A federation of more parties than the panel lists: how many, how many online, how many are listed. */
export interface IPopulation {
  parties: number;
  online: number;
  shown: number;
}

export interface ISnapshot {
  type: 'snapshot';
  seq: number;
  /** Null: the kernel has fednb loaded but no federation. */
  parties: IParty[] | null;
  /** A population (a pool simulation of thousands): `parties` lists only this round's and those not online. */
  population: IPopulation | null;
  run: IRun | null;
  /** Null: the kernel serves no party. */
  approvals: IApproval[] | null;
}

export interface IResult {
  type: 'result';
  request: string;
  ok: boolean;
  message: string;
}

export interface IHello {
  type: 'hello';
  version: number;
}

export type KernelMessage = ISnapshot | IResult | IHello;

export type Request =
  | { type: 'refresh' }
  | { type: 'stop' }
  | { type: 'approve'; id: string }
  | { type: 'deny'; id: string };

const RUN_STATES: readonly string[] = [
  'training',
  'stopping',
  'done',
  'stopped',
  'error'
];
const MAX_ID = 128;

/** Why a message was rejected. */
export class ProtocolError extends Error {}

type Obj = Record<string, unknown>;

function isObject(value: unknown): value is Obj {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function str(o: Obj, key: string, where: string): string {
  const value = o[key];
  if (typeof value !== 'string') {
    throw new ProtocolError(`${where}.${key} must be a string`);
  }
  return value;
}

function num(o: Obj, key: string, where: string): number {
  const value = o[key];
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new ProtocolError(`${where}.${key} must be a finite number`);
  }
  return value;
}

function optNum(o: Obj, key: string, where: string): number | null {
  return o[key] === null || o[key] === undefined ? null : num(o, key, where);
}

function optStr(o: Obj, key: string, where: string): string | null {
  return o[key] === null || o[key] === undefined ? null : str(o, key, where);
}

function int(o: Obj, key: string, where: string): number {
  const value = num(o, key, where);
  if (!Number.isInteger(value) || value < 0) {
    throw new ProtocolError(`${where}.${key} must be a non-negative integer`);
  }
  return value;
}

function optInt(o: Obj, key: string, where: string): number | null {
  return o[key] === null || o[key] === undefined ? null : int(o, key, where);
}

function list(value: unknown, where: string): unknown[] {
  if (!Array.isArray(value)) {
    throw new ProtocolError(`${where} must be a list`);
  }
  return value;
}

function parsePrivacy(value: unknown, where: string): IPrivacy | null {
  if (value === null || value === undefined) {
    return null;
  }
  if (!isObject(value)) {
    throw new ProtocolError(`${where} must be an object or null`);
  }
  return {
    epsilonSpent: optNum(value, 'epsilon_spent', where),
    epsilonBudget: num(value, 'epsilon_budget', where),
    epsilonRemaining: optNum(value, 'epsilon_remaining', where),
    delta: optNum(value, 'delta', where),
    charges: optInt(value, 'charges', where) ?? 0
  };
}

function parseParty(value: unknown, i: number): IParty {
  const where = `parties[${i}]`;
  if (!isObject(value)) {
    throw new ProtocolError(`${where} must be an object`);
  }
  const privacy = parsePrivacy(value['privacy'], `${where}.privacy`);
  return {
    name: str(value, 'name', where),
    endpoint: str(value, 'endpoint', where),
    status: str(value, 'status', where),
    examples: optInt(value, 'examples', where),
    lastRound: optInt(value, 'last_round', where),
    lastSeen: optNum(value, 'last_seen', where),
    activity: optStr(value, 'activity', where),
    error: optStr(value, 'error', where) ?? '',
    containment: optStr(value, 'containment', where) ?? 'unknown',
    ...(privacy === null ? {} : { privacy })
  };
}

function parseRun(value: unknown): IRun | null {
  if (value === null || value === undefined) {
    return null;
  }
  if (!isObject(value)) {
    throw new ProtocolError('run must be an object or null');
  }
  const state = str(value, 'state', 'run');
  if (!RUN_STATES.includes(state)) {
    throw new ProtocolError(`run.state ${JSON.stringify(state)} is unknown`);
  }
  const run: IRun = {
    state: state as RunState,
    strategy: str(value, 'strategy', 'run'),
    round: int(value, 'round', 'run'),
    rounds: int(value, 'rounds', 'run'),
    roundsDone: int(value, 'rounds_done', 'run'),
    accuracy: optNum(value, 'accuracy', 'run'),
    loss: optNum(value, 'loss', 'run'),
    elapsed: num(value, 'elapsed', 'run'),
    background: value['background'] === true,
    error: optStr(value, 'error', 'run'),
    secure: optStr(value, 'secure', 'run')
  };
  if (run.round > run.rounds || run.roundsDone > run.rounds) {
    throw new ProtocolError('run.round and run.rounds_done must not exceed run.rounds');
  }
  return run;
}

function parseApproval(value: unknown, i: number): IApproval {
  const where = `approvals[${i}]`;
  if (!isObject(value)) {
    throw new ProtocolError(`${where} must be an object`);
  }
  const id = str(value, 'id', where);
  if (id.length === 0 || id.length > MAX_ID) {
    throw new ProtocolError(`${where}.id must have 1 to ${MAX_ID} characters`);
  }
  return {
    id,
    coordinator: str(value, 'coordinator', where),
    kind: str(value, 'kind', where),
    code: str(value, 'code', where),
    returns: optStr(value, 'returns', where) ?? '',
    hash: str(value, 'hash', where),
    age: optNum(value, 'age', where)
  };
}

/** Check one message from the kernel; throws ProtocolError on anything malformed. */
export function parseKernelMessage(data: unknown): KernelMessage {
  if (!isObject(data)) {
    throw new ProtocolError('a message must be a JSON object');
  }
  switch (data['type']) {
    case 'hello':
      return { type: 'hello', version: int(data, 'version', 'hello') };
    case 'result':
      return {
        type: 'result',
        request: str(data, 'request', 'result'),
        ok: data['ok'] === true,
        message: str(data, 'message', 'result')
      };
    case 'snapshot': {
      if (data['version'] !== PROTOCOL_VERSION) {
        throw new ProtocolError(
          `snapshot version ${JSON.stringify(data['version'])} is not ${PROTOCOL_VERSION}: ` +
            'the fednb package and its JupyterLab extension differ'
        );
      }
      let parties: IParty[] | null = null;
      let population: IPopulation | null = null;
      const federation = data['federation'];
      if (federation !== null && federation !== undefined) {
        if (!isObject(federation)) {
          throw new ProtocolError('federation must be an object or null');
        }
        parties = list(federation['parties'], 'federation.parties').map(parseParty);
        const counts = federation['population'];
        if (counts !== null && counts !== undefined) {
          if (!isObject(counts)) {
            throw new ProtocolError('federation.population must be an object or null');
          }
          population = {
            parties: int(counts, 'parties', 'federation.population'),
            online: int(counts, 'online', 'federation.population'),
            shown: int(counts, 'shown', 'federation.population')
          };
          if (population.shown !== parties.length || population.online > population.parties) {
            throw new ProtocolError('federation.population does not fit its parties');
          }
        }
      }
      const approvals =
        data['approvals'] === null || data['approvals'] === undefined
          ? null
          : list(data['approvals'], 'approvals').map(parseApproval);
      return {
        type: 'snapshot',
        seq: int(data, 'seq', 'snapshot'),
        parties,
        population,
        run: parseRun(data['run']),
        approvals
      };
    }
    default:
      throw new ProtocolError(`unknown message type ${JSON.stringify(data['type'])}`);
  }
}

/** A request as it goes on the wire, checked like the kernel checks it. */
export function encodeRequest(request: Request): Record<string, string> {
  if (request.type === 'approve' || request.type === 'deny') {
    if (request.id.length === 0 || request.id.length > MAX_ID) {
      throw new ProtocolError(`a request id must have 1 to ${MAX_ID} characters`);
    }
    return { type: request.type, id: request.id };
  }
  return { type: request.type };
}
