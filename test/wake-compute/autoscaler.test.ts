/** The autoscaler (wake-compute/autoscaler.ts): its policy (`decide`, `clampCu`) and that a decision made stale by a pin is dropped. */
import t from 'tap';
import { clampCu, decide } from '../../wake-compute/autoscaler.ts';

t.test('clampCu snaps to the 0.25 grid within the bounds', async (t) => {
  t.equal(clampCu(0.3, 0.25, 2), 0.25);
  t.equal(clampCu(0.4, 0.25, 2), 0.5);
  t.equal(clampCu(8, 0.25, 2), 2);
  t.equal(clampCu(0.1, 0.5, 2), 0.5);
});

t.test('up at once when CPU or memory is hot, never past max_cu', async (t) => {
  t.match(decide(0.5, 0.25, 2, { cpu: 0.9 }, 2), { cu: 1, coldStreak: 0 }, 'hot CPU doubles');
  t.match(decide(0.5, 0.25, 2, { cpu: 0.1, memory: 0.8 }, 0), { cu: 1 }, 'hot memory doubles');
  t.match(decide(2, 0.25, 2, { cpu: 1 }, 0), { cu: 2 }, 'at max it stays');
  t.match(decide(1.5, 0.25, 2, { cpu: 1 }, 0), { cu: 2 }, 'clamped to max');
});

t.test('down only after three cold samples in a row, never below min_cu', async (t) => {
  let s = decide(1, 0.25, 2, { cpu: 0.05, memory: 0.1 }, 0);
  t.match(s, { cu: 1, coldStreak: 1 });
  s = decide(1, 0.25, 2, { cpu: 0.05, memory: 0.1 }, s.coldStreak);
  t.match(s, { cu: 1, coldStreak: 2 });
  s = decide(1, 0.25, 2, { cpu: 0.05 }, s.coldStreak);
  t.match(s, { cu: 0.5, coldStreak: 0 }, 'third cold sample halves (memory unknown counts as cold)');
  t.match(decide(0.25, 0.25, 2, { cpu: 0 }, 2), { cu: 0.25 }, 'not below min');
  t.match(decide(1, 0.25, 2, { cpu: 0.5 }, 2), { cu: 1, coldStreak: 0 }, 'a steady sample resets the streak');
  t.match(decide(1, 0.25, 2, { cpu: 0.05, memory: 0.5 }, 2), { cu: 1, coldStreak: 0 }, 'memory in use keeps it');
});

t.test('a decision measured before a pin arrived is dropped (the pin wins)', async (t) => {
  const { Autoscaler } = await import('../../wake-compute/autoscaler.ts');
  const { Registry } = await import('prom-client');
  const { createLogger } = await import('../../lib/logger.ts');
  // Small doubles: a store row that a PATCH pins between the measurement and the resize, and a
  // manager that asks the autoscaler's check under its lock as ComputeManager.resize does.
  const run = async (pinDuringDecision: boolean): Promise<number> => {
    let current = 0.5;
    let reads = 0;
    let pinned = false;
    const row = () => ({ id: 'ep-a', min_cu: 0.25, max_cu: 1, cu_override: pinned ? 0.5 : null });
    const store = {
      findEndpoint: async () => {
        reads++;
        // Tick 4 reads the row (stale) and then checks it again before resizing: the pin lands in between.
        if (pinDuringDecision && reads === 5) pinned = true;
        return row();
      },
    };
    const manager = {
      activeComputes: () => [{ id: 'ep-a', cu: current }],
      cu: () => current,
      resize: async (_id: string, cu: number, _why: string, stillWanted?: (c: number) => Promise<boolean>) => {
        if (stillWanted && !(await stillWanted(current))) return false;
        current = cu;
        return true;
      },
    };
    const driver = { kind: 'double', resize: async () => {}, usage: async () => ({ cpuSeconds: 1, size: { cpu: 0.5, memoryMiB: 2048 }, memoryUsedMiB: 100 }) };
    const a = new Autoscaler({ store, driver, manager, logger: createLogger({ level: 'error', service: 't', stream: { write: () => {} } }), registry: new Registry(), intervalMs: 0 } as never);
    for (let i = 0; i < 4; i++) {
      await new Promise((r) => setTimeout(r, 5));
      await a.tick();
    }
    return current;
  };
  t.equal(await run(false), 0.25, 'three cold samples after the first: halved');
  t.equal(await run(true), 0.5, 'the same decision with a pin arriving while it was made: dropped');
});
