/** Compute drivers. `process` is the embedded default, `qemu` runs each compute in its own VM; `kubernetes` comes later behind the same contract. */
export type { AdminCredentials, ComputeAddress, ComputeDriver, ComputeExit, ComputeResources, ComputeSize, ComputeSpec, ComputeStatus, ControlData, StartPlan, WalSource } from './api.ts';
export { materialise, restoreCommand, RESTORE_WAL_SCRIPT, type MaterialiseOptions, type MaterialiseResult } from './materialise.ts';
export { checkpointRecordEnd, markNotShutDown } from './pg-control.ts';
export { ProcessDriver, type ProcessDriverOptions } from './process.ts';
export { detectAccel, QemuDriver, type Accel, type QemuDriverOptions } from './qemu.ts';
export { defaultImageDir, ensureImage, findImage, type VmImage } from './qemu-image.ts';
