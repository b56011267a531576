export * from './address-spaces.ts';
export * from './planner.ts';
export * from './table.ts';
export * from './types.ts';
