/** Human-friendly ids: `ep-<adjective>-<noun>-<6 digits>` (DESIGN §3). */
import { randomInt } from 'node:crypto';

const ADJECTIVES = ['cool', 'calm', 'bold', 'brave', 'bright', 'crimson', 'damp', 'dark', 'divine', 'empty', 'fancy', 'floral', 'frosty', 'gentle', 'hidden', 'icy', 'jolly', 'late', 'lingering', 'little', 'lively', 'long', 'misty', 'morning', 'muddy', 'old', 'orange', 'patient', 'plain', 'polished', 'proud', 'purple', 'quiet', 'red', 'restless', 'rough', 'round', 'royal', 'shiny', 'silent', 'small', 'snowy', 'soft', 'solitary', 'sparkling', 'spring', 'square', 'steep', 'still', 'summer', 'sweet', 'throbbing', 'tight', 'tiny', 'twilight', 'wandering', 'weathered', 'white', 'wild', 'winter', 'wispy', 'withered', 'young'] as const;
const NOUNS = ['lake', 'river', 'sea', 'sky', 'cloud', 'field', 'forest', 'frost', 'glade', 'grass', 'haze', 'hill', 'leaf', 'meadow', 'moon', 'morning', 'mountain', 'night', 'paper', 'pine', 'pond', 'rain', 'resonance', 'shadow', 'shape', 'silence', 'smoke', 'snow', 'snowflake', 'sound', 'star', 'sun', 'sunset', 'surf', 'thunder', 'tree', 'violet', 'voice', 'water', 'waterfall', 'wave', 'wildflower', 'wind', 'wood', 'bird', 'brook', 'butterfly', 'bush', 'cherry', 'darkness', 'dawn', 'dew', 'dream', 'dust', 'feather', 'fire', 'firefly', 'flower', 'fog', 'breeze'] as const;

function pick<T>(xs: readonly T[]): T {
  return xs[randomInt(xs.length)]!;
}

export function friendlyName(): string {
  return `${pick(ADJECTIVES)}-${pick(NOUNS)}-${String(randomInt(1_000_000)).padStart(6, '0')}`;
}

export const newProjectId = (): string => friendlyName();
export const newBranchId = (): string => `br-${friendlyName()}`;
export const newEndpointId = (): string => `ep-${friendlyName()}`;
