/**
 * The fastify route schema of each REST method, built from the API table (services/api/api-table.ts):
 * fastify validates requests and serializes answers with it, and @fastify/swagger makes the OpenAPI
 * document of it. Only the words about error statuses are written here.
 */
import { API_ROOT, type ApiMethod, type HttpBinding } from './api-table.ts';
import { messageSchema } from './json-schema.ts';
import { MAPD_PACKAGE } from './proto.ts';

/** What each error status means; every one answers `{"error": {...}}`. */
const ERRORS = {
  400: 'Invalid argument: error.field names the field at fault; nothing changed',
  401: 'Missing or wrong bearer token (when the server is started with one)',
  403: 'Permission denied (a memory path outside the allowed roots, a socket path outside the attach directory)',
  404: 'No such device or memory',
  409: 'Conflicts with the current state (overlap, a split refused by exact, memory still mapped, quota exceeded, asid 0 of a device attached to a VMM); nothing changed',
  429: 'Too many requests queued for the device: retry after Retry-After',
  502: "The device refused: error.errno is the kernel's errno",
  503: 'The agent is unavailable: nothing was done; retry after Retry-After',
} as const;
type ErrorStatus = keyof typeof ERRORS;

/** The errors an operation may answer, by what it does. */
function errorsOf(method: ApiMethod & { http: HttpBinding }): readonly ErrorStatus[] {
  if (method.name === 'RegisterMemory') return [400, 401, 403, 404, 409, 503];
  if (method.name === 'UnregisterMemory') return [400, 401, 404, 409, 503];
  if (method.name === 'Flush') return [400, 401, 404, 503];
  if (method.http.verb !== 'GET') return [400, 401, 404, 409, 429, 502, 503];
  return method.http.pathFields.length === 0 ? [401] : [400, 401, 404];
}

const errorInfo = messageSchema(API_ROOT.lookupType(`${MAPD_PACKAGE}.ErrorInfo`), 'response');
/** The REST error body, `{"error": {code, message, field?, errno?}}`. */
export const ERROR_BODY = { type: 'object', additionalProperties: false, properties: { error: errorInfo } };

/** The comment's first line is the summary, the rest the description. */
function summary(comment: string | undefined): { summary: string; description?: string } {
  const [first = '', ...rest] = (comment ?? '').split('\n');
  const description = rest.join(' ').trim();
  return { summary: first.replace(/\.$/, ''), ...(description === '' ? {} : { description }) };
}

/** The route schema of one REST method: request parts, answers and documentation. */
export function routeSchema(method: ApiMethod & { http: HttpBinding }) {
  const { http } = method;
  const success =
    http.status === 204
      ? { type: 'null', description: summary(method.comment).summary }
      : { ...messageSchema(method.response, 'response'), description: summary(method.comment).summary };
  return {
    tags: [method.service.slice(method.service.lastIndexOf('.') + 1)],
    operationId: method.name,
    ...summary(method.comment),
    ...(http.pathFields.length > 0
      ? { params: messageSchema(method.request, 'request', http.pathFields) }
      : {}),
    querystring: messageSchema(method.request, 'request', http.queryFields),
    ...(http.bodyFields ? { body: messageSchema(method.request, 'request', http.bodyFields) } : {}),
    response: {
      [http.status]: success,
      ...Object.fromEntries(
        errorsOf(method).map((code) => [code, { ...ERROR_BODY, description: ERRORS[code] }]),
      ),
      default: { ...ERROR_BODY, description: 'Any other error, e.g. 500 INTERNAL' },
    },
  };
}
