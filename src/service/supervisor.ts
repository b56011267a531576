/**
 * The link to the agent. Follows the port's events (connected, disconnected, restarted,
 * reconnectFailed) and after every (re)connection runs one pass of `onConnected` (device listing,
 * memory, reconciliation). Passes never overlap: a request for a pass while one runs gets the
 * next one. A failed pass, or a failed connect, is retried with exponential backoff.
 */
import type { AgentInfo } from '../agent/wire.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { AgentPort, AgentPortEvents } from '../core/agent-port.ts';
import type { CoreLogger } from '../core/logger.ts';

export interface SupervisorOptions {
  port: AgentPort;
  metrics: Metrics;
  logger: CoreLogger | undefined;
  /** One pass once the agent answers; true when every device is ready. */
  onConnected: (info: AgentInfo) => Promise<boolean>;
  /** The agent is unreachable or restarted: writes must stop until the next pass. */
  onLost: (reason: string) => void;
  retryInitialMs: number;
  retryMaxMs: number;
}

export class AgentSupervisor {
  private isUp = false;
  /** The current outage has been logged. */
  private lostLogged = false;
  private bootId: string | undefined;
  private running: Promise<void> | undefined;
  private next: Promise<void> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private delay: number;
  private stopped = false;
  private readonly handlers: { [K in keyof AgentPortEvents]: (...args: AgentPortEvents[K]) => void };

  constructor(private readonly opts: SupervisorOptions) {
    this.delay = opts.retryInitialMs;
    this.handlers = {
      connected: () => void this.sync(),
      disconnected: (err) => this.down(`the agent is unreachable (${err.message})`),
      restarted: ({ bootId }) => {
        this.opts.onLost(`the agent restarted (boot id ${bootId})`);
        void this.sync();
      },
      reconnectFailed: () => this.retryLater(),
    };
  }

  get up(): boolean {
    return this.isUp;
  }

  start(): void {
    const { port } = this.opts;
    port.on('connected', this.handlers.connected);
    port.on('disconnected', this.handlers.disconnected);
    port.on('restarted', this.handlers.restarted);
    port.on('reconnectFailed', this.handlers.reconnectFailed);
    void this.sync();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    const { port } = this.opts;
    port.off('connected', this.handlers.connected);
    port.off('disconnected', this.handlers.disconnected);
    port.off('restarted', this.handlers.restarted);
    port.off('reconnectFailed', this.handlers.reconnectFailed);
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
      const again = this.bootId !== undefined || this.lostLogged;
      this.opts.logger?.info({ bootId: info.bootId }, again ? 'agent link reconnected' : 'agent link up');
    }
    this.isUp = true;
    this.lostLogged = false;
    this.opts.metrics.agentUp.set(1);
    if (this.bootId !== undefined && this.bootId !== info.bootId) {
      this.opts.logger?.warn(
        { bootId: info.bootId, was: this.bootId },
        'agent link: the agent restarted; reconciling',
      );
      this.opts.metrics.agentRestarts.inc();
      this.opts.onLost(`the agent restarted (boot id ${info.bootId})`);
    }
    this.bootId = info.bootId;
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
}
