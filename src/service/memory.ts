/**
 * Registered memory as part of the desired state. The agent keeps no state: after it restarts,
 * every desired memory is registered again before any mapping is re-applied. Memory the agent
 * created lives in a file under its state directory, so it is re-opened by that path, like memory
 * that was registered by path (the API creates only file-backed memory: a memfd would not outlive
 * the agent).
 *
 * A desired memory the agent cannot open again (the file is gone, or swapped for a symlink out of
 * its allowed roots) is *unavailable*: only the mappings that use it are left off the devices (see
 * reconcile.ts), new writes that need it are refused, and each pass tries it again. Registering it
 * again with the same path (once the operator restored the file) brings it back at once.
 *
 * Registering and unregistering need the agent (UNAVAILABLE while it is down) and run one at a
 * time. A memory referenced by a queued request is pinned, and one being unregistered is hidden
 * from validation, so an unregister can never race a map into it.
 */
import type { RegisterMemoryRequest as AgentRegisterRequest } from '../agent/wire.ts';
import type { MemoryInfo } from '../memory/types.ts';
import type { MemoryLookup } from '../queue/validate.ts';
import type { MemoryRecord } from '../state/desired.ts';
import type { StateStore } from '../state/store.ts';
import type { AgentPort } from '../core/agent-port.ts';
import { fromAgentError } from '../core/agent-errors.ts';
import { ERROR_CATALOG, ServiceError } from '../core/errors.ts';
import type { CoreLogger } from '../core/logger.ts';
import type { MemoryView, RegisterMemoryRequest } from '../core/types.ts';

function recordOf(info: MemoryInfo): Omit<MemoryRecord, 'registeredAt'> {
  return { id: info.id, path: info.path, kind: info.kind, created: info.created, size: info.size };
}

/** What the operator can do about an unavailable memory. */
export function memoryRemedy(id: string, path: string): string {
  return (
    `restore ${path} as a regular file under the agent's allowed roots and register memory ${id} ` +
    'again with that path, or unmap every mapping of it and unregister it'
  );
}

export class MemoryCatalog implements MemoryLookup {
  private readonly pins = new Map<string, number>();
  private readonly removing = new Set<string>();
  /** Desired memory the agent could not register again, with why. */
  private readonly unreachable = new Map<string, string>();
  private lock: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly store: StateStore,
    private readonly port: AgentPort,
    private readonly agentUp: () => boolean,
    private readonly logger: CoreLogger | undefined,
    /** An unavailable memory was registered again: its mappings can be restored. */
    private readonly onRestored: () => void = () => undefined,
  ) {}

  sizeOf(id: string): bigint | undefined {
    return this.removing.has(id) ? undefined : this.store.state.memory.get(id)?.size;
  }

  /** Why desired memory `id` is not open at the agent; undefined when it is (or is not desired). */
  unavailable(id: string): string | undefined {
    return this.unreachable.get(id);
  }

  /** Whether any desired memory is unavailable (a pass should try it again later). */
  get degraded(): boolean {
    return this.unreachable.size > 0;
  }

  /** Marks `ids` as used by a queued request; returns the release. */
  pin(ids: readonly string[]): () => void {
    for (const id of ids) this.pins.set(id, (this.pins.get(id) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      for (const id of ids) {
        const n = (this.pins.get(id) ?? 1) - 1;
        if (n === 0) this.pins.delete(id);
        else this.pins.set(id, n);
      }
    };
  }

  list(): MemoryView[] {
    return [...this.store.state.memory.values()].map((m) => this.view(m));
  }

  register(req: RegisterMemoryRequest): Promise<MemoryView> {
    return this.serialized(async () => {
      if (typeof req.id !== 'string' || req.id === '') {
        throw new ServiceError('INVALID_ARGUMENT', 'id is required', { field: 'id' });
      }
      if ((req.path === undefined) === (req.size === undefined)) {
        throw new ServiceError(
          'INVALID_ARGUMENT',
          'give exactly one of path (open a file) or size (create memory)',
          {
            field: req.path === undefined ? 'path' : 'size',
          },
        );
      }
      const known = this.store.state.memory.get(req.id);
      if (known && req.path !== undefined && req.path === known.path) {
        // The same file again: the remedy of an unavailable memory, or a retry. The agent pass
        // also reopens an unavailable memory by itself once its file is back, so the operator's
        // request may come after that: it is answered with the registration it asks for.
        if (this.unreachable.has(req.id)) {
          this.requireAgent();
          await this.reopen(known);
          this.onRestored();
        }
        return this.view(known);
      }
      if (known) {
        const hint = this.unreachable.has(req.id)
          ? ` (it is unavailable: register it again with its path ${known.path})`
          : '';
        throw new ServiceError('ALREADY_EXISTS', `memory ${req.id} is already registered${hint}`, {
          field: 'id',
        });
      }
      this.requireAgent();
      const agentReq: AgentRegisterRequest =
        req.path !== undefined ? { id: req.id, path: req.path } : { id: req.id, size: req.size! };
      let info: MemoryInfo;
      try {
        info = await this.port.registerMemory(agentReq);
      } catch (e) {
        throw fromAgentError(e, `registering memory ${req.id}`);
      }
      const record: MemoryRecord = { ...recordOf(info), registeredAt: new Date().toISOString() };
      try {
        await this.store.commit([{ t: 'memory.put', memory: record }]);
      } catch (e) {
        // Not acknowledged: take it back at the agent (if that fails too, the next pass adopts it).
        await this.port.releaseMemory(req.id).catch(() => undefined);
        throw e;
      }
      return this.view(record);
    });
  }

  unregister(id: string): Promise<void> {
    return this.serialized(async () => {
      if (!this.store.state.memory.has(id)) {
        throw new ServiceError('NOT_FOUND', `memory ${JSON.stringify(id)} is not registered`, {
          field: 'id',
        });
      }
      const mapped = this.store.state.memoryUse.get(id) ?? 0;
      if (mapped > 0) {
        throw new ServiceError(
          'FAILED_PRECONDITION',
          `memory ${id} is still mapped by ${mapped} mapping(s)`,
          {
            field: 'id',
          },
        );
      }
      const queued = this.pins.get(id) ?? 0;
      if (queued > 0) {
        throw new ServiceError('FAILED_PRECONDITION', `memory ${id} is used by ${queued} queued request(s)`, {
          field: 'id',
        });
      }
      this.requireAgent();
      // Hidden from validation from now on, so no request can start using it meanwhile.
      this.removing.add(id);
      try {
        // Released at the agent first: if the desired-state commit then fails, the memory is
        // still desired and reconciliation registers it again (by path), so nothing is lost.
        await this.port.releaseMemory(id).catch((e: unknown) => {
          const err = fromAgentError(e, `releasing memory ${id}`);
          if (err.code !== 'NOT_FOUND') throw err;
        });
        await this.store.commit([{ t: 'memory.delete', id }]);
        this.markAvailable(id);
      } finally {
        this.removing.delete(id);
      }
    });
  }

  /**
   * Makes the agent's memory and the desired memory agree: desired memory the agent does not hold
   * (as ours) is registered again by path; memory the agent holds that is not desired (given to it
   * at its start, --memory) is adopted into the desired state, so it can be mapped and is restored
   * after the next agent restart.
   */
  syncWithAgent(): Promise<void> {
    return this.serialized(async () => {
      const held = new Map((await this.port.listMemory()).map((m) => [m.id, m]));
      const reopening: Promise<void>[] = [];
      for (const want of this.store.state.memory.values()) {
        const have = held.get(want.id);
        if (have && have.path === want.path && have.size === want.size) {
          this.markAvailable(want.id);
          continue;
        }
        // Each memory on its own (all at once: an agent that restarted holds none of them).
        const reopen = async () => {
          if (have) await this.port.releaseMemory(want.id);
          await this.reopen(want);
        };
        // A failure is marked unavailable: only the mappings that use it are left off their devices.
        reopening.push(reopen().catch(() => undefined));
      }
      await Promise.all(reopening);
      for (const m of held.values()) {
        if (this.store.state.memory.has(m.id)) continue;
        const record: MemoryRecord = { ...recordOf(m), registeredAt: new Date().toISOString() };
        await this.store.commit([{ t: 'memory.put', memory: record }]).then(
          () => this.logger?.info({ memory: m.id, path: m.path }, 'adopted memory registered at the agent'),
          (e: unknown) => this.logger?.warn({ memory: m.id, err: String(e) }, 'memory not adopted'),
        );
      }
    });
  }

  /**
   * Memory an attached VMM's table names is memory the agent adopted from the VMM's fds: unknown
   * ids are learnt from the agent's listing (syncWithAgent adopts them).
   */
  async learnFromAgent(ids: readonly string[]): Promise<void> {
    // An id the agent held before it restarted is unavailable until the listing shows it again.
    if (ids.every((id) => this.store.state.memory.has(id) && !this.unreachable.has(id))) return;
    await this.syncWithAgent();
  }

  /**
   * A VMM's memory its table no longer names is released by the agent once unmapped: forgotten
   * here too when nothing maps it or waits to (the agent could not open it again after a restart).
   */
  forgetVmmMemory(ids: readonly string[]): Promise<void> {
    return this.serialized(async () => {
      for (const id of ids) {
        if (!this.store.state.memory.has(id)) continue;
        if ((this.store.state.memoryUse.get(id) ?? 0) > 0 || (this.pins.get(id) ?? 0) > 0) continue;
        await this.store.commit([{ t: 'memory.delete', id }]);
        this.markAvailable(id);
      }
    });
  }

  /** Registers desired memory `want` again by its path; marks it unavailable (and throws) if it cannot. */
  private async reopen(want: MemoryRecord): Promise<void> {
    let info: MemoryInfo;
    try {
      info = await this.port.registerMemory({ id: want.id, path: want.path });
    } catch (e) {
      const err = fromAgentError(e, `registering memory ${want.id} again`);
      if (err.code !== 'UNAVAILABLE') this.markUnavailable(want, err.message);
      throw err;
    }
    if (info.size !== want.size) {
      this.logger?.warn(
        { memory: want.id, want: String(want.size), got: String(info.size) },
        'memory size changed',
      );
    }
    this.markAvailable(want.id);
  }

  /** Logged once per change of state (or of reason), not on every retry. */
  private markUnavailable(want: MemoryRecord, reason: string): void {
    if (this.unreachable.get(want.id) === reason) return;
    this.unreachable.set(want.id, reason);
    this.logger?.warn(
      {
        memory: want.id,
        path: want.path,
        mappings: this.store.state.memoryUse.get(want.id) ?? 0,
        err: reason,
        remedy: memoryRemedy(want.id, want.path),
      },
      'memory unavailable: its mappings are not restored',
    );
  }

  private markAvailable(id: string): void {
    if (!this.unreachable.delete(id)) return;
    this.logger?.info({ memory: id }, 'memory available again');
  }

  private requireAgent(): void {
    if (!this.agentUp()) {
      throw new ServiceError('UNAVAILABLE', 'the agent is not connected', {
        retryAfterMs: ERROR_CATALOG.UNAVAILABLE.retryAfterMs,
      });
    }
  }

  private view(m: MemoryRecord): MemoryView {
    return {
      id: m.id,
      path: m.path,
      kind: m.kind,
      created: m.created,
      size: m.size,
      mappedEntries: this.store.state.memoryUse.get(m.id) ?? 0,
    };
  }

  private serialized<T>(task: () => Promise<T>): Promise<T> {
    const run = this.lock.then(task, task);
    this.lock = run.catch(() => undefined);
    return run;
  }
}
