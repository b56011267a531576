/**
 * A damaged state journal, with real processes: one flipped byte in an early record of an API
 * server's journal, 50 acknowledged mappings on a live agent.
 * - The API server refuses to start, naming the file, the offset and the intact records after
 *   it; the journal is byte for byte as it was; the agent keeps all 50 mappings (nothing
 *   reconciled it down to a cut state).
 * - With --repair-state it starts, keeps every intact record (before and after the damage),
 *   keeps the damaged bytes aside and logs which record they held and what its neighbours say.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import { agentTable, createRig, desiredTable } from './process-harness.ts';

const MAPPINGS = 50;
const iovaOf = (i: number) => 0x100000n + BigInt(i) * 0x1000n;

/** Where the journal's frames start: a walk over their length fields. */
function frameOffsets(data: Buffer): number[] {
  const offsets: number[] = [];
  for (let o = 0; o + 8 <= data.length; o += 8 + data.readUInt32LE(o)) offsets.push(o);
  return offsets;
}

test('a flipped byte in an early journal record: the API server refuses to start and the device keeps its mappings; --repair-state keeps every intact record', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const rig = createRig(t, 'state-damage');
  await rig.startAgent();
  let api = await rig.startApi();
  assert.equal((await api.http('POST', '/v1/memory', { id: 'ram', size: '0x1000000' })).status, 201);
  for (let i = 0; i < MAPPINGS; i++) {
    const page = {
      iova: `0x${iovaOf(i).toString(16)}`,
      size: '0x1000',
      memory: 'ram',
      offset: `0x${(i * 0x1000).toString(16)}`,
      perm: 'rw',
    };
    const res = await api.http('POST', '/v1/devices/vdpa0/mappings', page);
    assert.equal(res.status, 201, JSON.stringify(res.body));
  }
  const agent = rig.agentClient();
  const all = await agentTable(agent, 'vdpa0');
  assert.equal(all.length, MAPPINGS);
  assert.deepEqual(await desiredTable(api, 'vdpa0'), all);
  assert.equal((await api.kill('SIGTERM')).code, 0);

  // One byte of the record that mapped the third page: a digit of its iova.
  const journals = fs.readdirSync(rig.apiStateDir).filter((f) => /^journal\.\d+$/.test(f));
  assert.equal(journals.length, 1);
  const journal = path.join(rig.apiStateDir, journals[0]!);
  const data = fs.readFileSync(journal);
  const victim = data.indexOf(`"iova":{"$n":"${iovaOf(2)}"}`);
  assert.ok(victim > 0);
  const offsets = frameOffsets(data);
  const frameIndex = offsets.filter((o) => o <= victim).length - 1;
  const frameStart = offsets[frameIndex]!;
  const frameLength = (offsets[frameIndex + 1] ?? data.length) - frameStart;
  const intactAfter = offsets.length - frameIndex - 1;
  assert.ok(intactAfter >= MAPPINGS - 3, `${intactAfter} records after the damaged one`);
  const digit = victim + '"iova":{"$n":"'.length;
  data[digit] = data[digit] === 0x39 ? 0x38 : data[digit]! + 1;
  fs.writeFileSync(journal, data);
  const files = fs.readdirSync(rig.apiStateDir).sort();

  // Refused: the message names file, offset and the intact records after it; nothing is touched.
  const refusal = await rig.startApi().then(
    () => assert.fail('the API server started on a damaged journal'),
    (e: Error) => e.message,
  );
  assert.match(refusal, /exited \(1\) before listening/);
  assert.ok(
    refusal.includes(
      `state journal ${journal} is damaged at byte ${frameStart} (CRC mismatch; ${frameLength} bytes`,
    ),
    refusal,
  );
  assert.ok(refusal.includes(`${intactAfter} intact records follow it`), refusal);
  assert.ok(refusal.includes('--repair-state'), refusal);
  assert.deepEqual(fs.readFileSync(journal), data, 'the journal is byte for byte as it was');
  assert.deepEqual(fs.readdirSync(rig.apiStateDir).sort(), files);
  assert.deepEqual(await agentTable(agent, 'vdpa0'), all, 'the device keeps every mapping');

  // Repaired: every intact record kept, the damaged bytes aside, the dropped record named.
  api = await rig.startApi(['--repair-state']);
  const [dropped, ...more] = api.proc.logs().filter((r) => r.msg === 'state repair dropped damaged bytes');
  assert.deepEqual(more, []);
  assert.ok(dropped);
  assert.deepEqual(
    [dropped.file, dropped.offset, dropped.length, dropped.reason],
    [journal, frameStart, frameLength, 'CRC mismatch'],
  );
  assert.match(String(dropped.lostRecords), /^(\d+)\.\.\1$/, 'one record, by its sequence number');
  assert.match(String(dropped.before), /^record \d+ at byte \d+ \(.*mapping\.put vdpa0.*\)$/);
  assert.match(String(dropped.after), /^record \d+ at byte \d+ \(.*mapping\.put vdpa0.*\)$/);
  assert.match(String(dropped.text), /mapping\.put/);
  const repaired = api.proc.logs().find((r) => r.msg === 'state repaired: the damaged journal is kept aside');
  assert.ok(repaired);
  assert.equal(repaired.keptRecords, offsets.length - 2, 'every record but the damaged one (and the header)');
  assert.deepEqual(fs.readFileSync(String(repaired.aside)), data, 'the damaged journal, aside as it was');

  const lost = all.find((m) => m.includes(` 0x${iovaOf(2).toString(16)}+`))!;
  const kept = all.filter((m) => m !== lost);
  assert.deepEqual(await desiredTable(api, 'vdpa0'), kept);
  // Reconciled to the repaired state: the mapping of the dropped record, named in the log, is gone.
  assert.deepEqual(await agentTable(agent, 'vdpa0'), kept);
  t.diagnostic(`damaged record at byte ${frameStart} (${frameLength} bytes), ${intactAfter} intact after it`);

  // A later start reads a sound state: nothing to repair, nothing cut.
  assert.equal((await api.kill('SIGTERM')).code, 0);
  api = await rig.startApi();
  assert.deepEqual(await desiredTable(api, 'vdpa0'), kept);
  assert.ok(!api.proc.logs().some((r) => String(r.msg).startsWith('state repair')));
});
