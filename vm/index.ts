/** Compute drivers. `process` is the embedded default; `qemu` and `kubernetes` come later behind the same contract. */
export type { AdminCredentials, ComputeAddress, ComputeDriver, ComputeExit, ComputeSpec, ComputeStatus, ControlData, StartPlan, WalSource } from './api.ts';
export { materialise, restoreCommand, RESTORE_WAL_SCRIPT, type MaterialiseOptions, type MaterialiseResult } from './materialise.ts';
export { checkpointRecordEnd, markNotShutDown } from './pg-control.ts';
export { ProcessDriver, type ProcessDriverOptions } from './process.ts';
