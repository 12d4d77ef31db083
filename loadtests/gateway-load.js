// Load: the release gate. Ramp to 50 VUs over 2 min, hold 5 min, ramp down
// over 2 min, with the realistic request mix; DESIGN.md's service levels as
// thresholds (gateway_latency p95 < 50 ms, p99 < 100 ms; errors < 1 %).
//   make loadtest SCRIPT=gateway-load.js            # ~9 min
//   DURATION_SCALE=0.1 make loadtest SCRIPT=gateway-load.js   # ~1 min
import exec from 'k6/execution';
import { controlPlane, latency, mixedIteration, planSeconds, SLO, stages } from './lib/common.js';

const PLAN = [[120, 50], [300, 50], [120, 0]];

export const options = {
  scenarios: {
    load: {
      executor: 'ramping-vus',
      startVUs: 0,
      stages: stages(PLAN),
      gracefulRampDown: '10s',
    },
    // Logins and admin listings alongside the data plane (when the runner passes credentials).
    control: {
      executor: 'constant-arrival-rate',
      rate: 12, timeUnit: '1m',
      duration: `${planSeconds(PLAN)}s`,
      preAllocatedVUs: 2,
      exec: 'control',
    },
  },
  thresholds: {
    ...SLO,
    ...latency({
      policy_check_latency: ['p(95)<50'],
      'http_req_duration{endpoint:messages,stream:false}': ['p(95)<500'],
    }),
  },
};

export default function () {
  mixedIteration(exec.vu.iterationInScenario);
}

export function control() {
  controlPlane();
}
