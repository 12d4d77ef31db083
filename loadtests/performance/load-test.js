// The classic load test: POST /ak/{ACCESS_KEY}/v1/messages (the key in the
// path, for clients that can only set a base URL), ramping 10 -> 50 -> 0 VUs.
// Pass: p95 of the whole request < 500 ms and errors < 1 %.
//   make loadtest SCRIPT=performance/load-test.js   # ~4 min
import http from 'k6/http';
import { check, sleep } from 'k6';
import { ACCESS_KEY, BASE_URL, latency, MODEL, record, stages, THINK_S } from '../lib/common.js';

export const options = {
  stages: stages([[30, 10], [60, 50], [120, 50], [30, 0]]),
  thresholds: {
    http_req_failed: ['rate<0.01'],
    ...latency({ http_req_duration: ['p(95)<500'], gateway_latency: ['p(95)<50', 'p(99)<100'] }),
  },
};

const url = `${BASE_URL}/ak/${ACCESS_KEY}/v1/messages`;
const params = {
  headers: { 'content-type': 'application/json', 'anthropic-version': '2023-06-01' },
  tags: { endpoint: 'messages', name: '/ak/{key}/v1/messages' },
};

export default function () {
  const body = JSON.stringify({
    model: MODEL, max_tokens: 256,
    messages: [{ role: 'user', content: 'Write a haiku about load balancers.' }],
  });
  const res = http.post(url, body, params);
  record(res, { endpoint: 'messages' });
  check(res, {
    'status 200': (r) => r.status === 200,
    'has content': (r) => r.body.includes('"content"'),
  });
  sleep(THINK_S * (0.5 + Math.random()));
}
