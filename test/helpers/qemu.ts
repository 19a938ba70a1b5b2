/**
 * The qemu driver's compute image for tests: built once per machine (`npm test`'s pretest builds
 * it; a test run alone builds it here, under the image builder's lock) in $XENON_VM_IMAGE_DIR,
 * default /var/tmp/xenon-vm-image, so every test file of a run shares one.
 */
import { silentLogger } from '../../lib/logger.ts';
import { ensureImage, type VmImage } from '../../vm/qemu-image.ts';

export const TEST_IMAGE_DIR = process.env.XENON_VM_IMAGE_DIR || '/var/tmp/xenon-vm-image';

export function testVmImage(): Promise<VmImage> {
  return ensureImage({ dir: TEST_IMAGE_DIR, logger: silentLogger });
}
