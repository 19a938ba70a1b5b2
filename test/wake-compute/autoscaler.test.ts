/** The autoscaler's policy (wake-compute/autoscaler.ts `decide`, `clampCu`): pure decisions. */
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
