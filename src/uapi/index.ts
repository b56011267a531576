export * from './constants.ts';
export * from './ioctl.ts';
export * from './message.ts';
export * from './vring.ts';
