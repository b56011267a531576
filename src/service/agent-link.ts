/**
 * The link to the agent, and the one place that retries reaching it. After every (re)connection it
 * runs one pass of `onConnected` (device listing, memory, reconciliation). Passes never overlap: a
 * request for a pass while one runs gets the next one. A failed connect, a pass that left a device
 * not ready, and a lost connection (the port's `disconnected`) all schedule the next pass with one
 * exponential backoff, for as long as the service runs (the port itself never retries).
 *
 * Whether the agent restarted is not decided here: every answer's boot id is checked against the
 * one the device was reconciled with (queue/agent-apply.ts), and a device reconciled with another
 * agent is reconciled again. The link only reports a new boot id (log, restarts counter).
 */
import type { AgentInfo } from '../agent/wire.ts';
import type { AgentPort } from '../core/agent-port.ts';
import type { CoreLogger } from '../core/logger.ts';
import type { Metrics } from '../metrics/metrics.ts';

export interface AgentLinkOptions {
  port: AgentPort;
  metrics: Metrics;
  logger: CoreLogger | undefined;
  /** One pass once the agent answers; true when every device is ready. */
  onConnected: (info: AgentInfo) => Promise<boolean>;
  /** The agent is unreachable: writes must stop until the next pass. */
  onLost: (reason: string) => void;
  retryInitialMs: number;
  retryMaxMs: number;
}

export class AgentLink {
  private isUp = false;
  /** The current outage has been logged. */
  private lostLogged = false;
  private lastBootId: string | undefined;
  private running: Promise<void> | undefined;
  private next: Promise<void> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private delay: number;
  private stopped = false;
  private readonly onDisconnected = (err: Error) => {
    this.down(`the agent is unreachable (${err.message})`);
    this.retryLater();
  };

  constructor(private readonly opts: AgentLinkOptions) {
    this.delay = opts.retryInitialMs;
  }

  get up(): boolean {
    return this.isUp;
  }

  /** The boot id of the agent last reached. */
  get bootId(): string | undefined {
    return this.lastBootId;
  }

  start(): void {
    this.opts.metrics.agentUp.set(0);
    this.opts.port.on('disconnected', this.onDisconnected);
    void this.sync();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    this.opts.port.off('disconnected', this.onDisconnected);
  }

  /** Resolves after a whole pass that started after this call. */
  sync(): Promise<void> {
    if (this.running === undefined) {
      this.running = this.pass().finally(() => {
        this.running = undefined;
      });
      return this.running;
    }
    this.next ??= this.running.then(() => {
      this.next = undefined;
      return this.sync();
    });
    return this.next;
  }

  /** Runs a pass after the current backoff delay (which then grows). */
  retryLater(): void {
    if (this.stopped || this.timer !== undefined) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.sync();
    }, this.delay);
    this.timer.unref();
    this.delay = Math.min(this.delay * 2, this.opts.retryMaxMs);
  }

  private async pass(): Promise<void> {
    if (this.stopped) return;
    let info: AgentInfo;
    try {
      info = await this.opts.port.connect();
    } catch (e) {
      this.down(`the agent is unreachable (${(e as Error).message})`);
      this.retryLater();
      return;
    }
    if (this.stopped) return;
    if (!this.isUp) {
      const again = this.lastBootId !== undefined || this.lostLogged;
      this.opts.logger?.info({ bootId: info.bootId }, again ? 'agent link reconnected' : 'agent link up');
    }
    this.isUp = true;
    this.lostLogged = false;
    this.opts.metrics.agentUp.set(1);
    if (this.lastBootId !== undefined && this.lastBootId !== info.bootId) {
      this.opts.logger?.warn(
        { bootId: info.bootId, was: this.lastBootId },
        'agent link: the agent restarted; reconciling',
      );
      this.opts.metrics.agentRestarts.inc();
    }
    this.lastBootId = info.bootId;
    let ready = false;
    try {
      ready = await this.opts.onConnected(info);
    } catch (e) {
      this.opts.logger?.warn({ err: (e as Error).message }, 'agent pass failed');
    }
    if (ready) this.delay = this.opts.retryInitialMs;
    else this.retryLater();
  }

  private down(reason: string): void {
    // Once per outage, not once per retry.
    if (this.isUp || !this.lostLogged) {
      this.opts.logger?.warn(
        { reason, retryInMs: this.delay },
        'agent link lost: writes refused until it is back',
      );
      this.lostLogged = true;
    }
    this.isUp = false;
    this.opts.metrics.agentUp.set(0);
    this.opts.onLost(reason);
  }
}
