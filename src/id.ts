/**
 * The one rule for names the service keeps (device and memory ids): 1 to 64 characters of
 * A-Z a-z 0-9 . _ -, starting with a letter or a digit. Memory ids become file names in the agent's
 * memory directory, so an id can be neither `.`/`..`/`...` nor an option-like `-x` or a hidden `.x`.
 */
export const ID_PATTERN = '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$';

/** What {@link ID_PATTERN} says, for error messages. */
export const ID_RULE = 'must be 1 to 64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit';

const ID = new RegExp(ID_PATTERN);

export function isValidId(value: unknown): value is string {
  return typeof value === 'string' && ID.test(value);
}
