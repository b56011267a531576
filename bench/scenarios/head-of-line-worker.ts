/**
 * The worker thread of head-of-line.ts: an API server of its own, on the bench's agent, with its own
 * heap and event loop inside the bench's process. With `nice`, the thread runs at that CPU priority
 * (Linux keeps a niceness per thread: setpriority on the thread's id). Sends its REST address once
 * ready; stops its server on any message and says "stopped".
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { DEFAULT_LIMITS } from '../../src/api/parse.ts';
import { apiConfig, rest, startReadyApi } from '../../test/integration/api-harness.ts';

export interface WorkerApiData {
  dir: string;
  socket: string;
  bodyLimit: number;
  /** Registered before the address is sent. */
  memory: { id: string; size: string };
  nice?: number;
}

const { dir, socket, bodyLimit, memory, nice } = workerData as WorkerApiData;
if (nice !== undefined) {
  // /proc/thread-self links to "<pid>/task/<tid>".
  const tid = Number(path.basename(fs.readlinkSync('/proc/thread-self')));
  os.setPriority(tid, nice);
}
const api = await startReadyApi(apiConfig(dir, socket, { limits: { ...DEFAULT_LIMITS, bodyLimit } }));
const answer = await rest(api.restAddress)('POST', '/v1/memory', memory);
if (answer.status >= 300) throw new Error(`POST /v1/memory: ${answer.status} ${JSON.stringify(answer.body)}`);
parentPort!.once('message', async () => {
  await api.stop();
  parentPort!.postMessage('stopped');
});
parentPort!.postMessage(api.restAddress);
