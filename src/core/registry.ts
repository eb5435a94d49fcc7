import { EventEmitter } from 'node:events';
import { Worker, type WorkerType } from './worker.js';

export interface RegistryEvents {
  added: [Worker];
  removed: [Worker];
  /** A worker's model id became known or changed. */
  modelChanged: [Worker, string | undefined];
}

/**
 * The single source of truth for workers, indexed by id and by model. Policies and routers
 * ask it for candidates on every request; nobody else keeps a worker list.
 */
export class WorkerRegistry extends EventEmitter<RegistryEvents> {
  private readonly byId = new Map<string, Worker>();
  private readonly byModel = new Map<string, Worker[]>();
  /** Registration order, so candidate lists do not depend on when a model was discovered. */
  private readonly order = new Map<Worker, number>();
  private seq = 0;

  add(worker: Worker): Worker {
    if (this.byId.has(worker.id)) throw new Error(`worker '${worker.id}' is already registered`);
    this.byId.set(worker.id, worker);
    this.order.set(worker, this.seq++);
    this.index(worker);
    this.emit('added', worker);
    return worker;
  }

  remove(id: string): Worker | undefined {
    const worker = this.byId.get(id);
    if (!worker) return undefined;
    this.byId.delete(id);
    this.unindex(worker);
    this.order.delete(worker);
    this.emit('removed', worker);
    return worker;
  }

  setModel(worker: Worker, modelId: string | undefined): void {
    if (worker.modelId === modelId) return;
    const before = worker.modelId;
    if (this.byId.get(worker.id) === worker) this.unindex(worker);
    worker.modelId = modelId;
    if (this.byId.get(worker.id) === worker) this.index(worker);
    this.emit('modelChanged', worker, before);
  }

  get(id: string): Worker | undefined {
    return this.byId.get(id);
  }

  /** All workers of a URL (several when data-parallel ranks are registered separately). */
  byUrl(url: string): Worker[] {
    return this.all().filter((w) => w.url === url);
  }

  all(): Worker[] {
    return [...this.byId.values()];
  }

  get size(): number {
    return this.byId.size;
  }

  /** Workers serving `model` of the given type, in registration order (healthy or not). */
  forModel(model: string, type: WorkerType = 'regular'): Worker[] {
    const list = this.byModel.get(model);
    if (!list) return [];
    return type === 'regular' ? list.filter((w) => w.type === 'regular') : list.filter((w) => w.type === type);
  }

  /** Models with at least one worker (any health). */
  models(): string[] {
    return [...this.byModel.keys()];
  }

  /** Models with at least one available worker. */
  healthyModels(): string[] {
    return [...this.byModel.entries()].filter(([, ws]) => ws.some((w) => w.isAvailable())).map(([m]) => m);
  }

  private index(worker: Worker): void {
    if (worker.modelId === undefined) return;
    let list = this.byModel.get(worker.modelId);
    if (!list) {
      list = [];
      this.byModel.set(worker.modelId, list);
    }
    // Keep each model's list in registration order.
    const rank = this.order.get(worker) ?? Infinity;
    let i = list.length;
    while (i > 0 && (this.order.get(list[i - 1]) ?? Infinity) > rank) i--;
    list.splice(i, 0, worker);
  }

  private unindex(worker: Worker): void {
    if (worker.modelId === undefined) return;
    const list = this.byModel.get(worker.modelId);
    if (!list) return;
    const i = list.indexOf(worker);
    if (i >= 0) list.splice(i, 1);
    if (list.length === 0) this.byModel.delete(worker.modelId);
  }
}
