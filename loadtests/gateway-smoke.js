// Smoke: 1 VU for 30 s through every entry point (data plane, and login and an
// admin listing when the runner passes credentials); zero errors allowed.
// Run before anything bigger: if this fails, the others are meaningless.
//   make loadtest SCRIPT=gateway-smoke.js
import exec from 'k6/execution';
import { chat, controlPlane, dur, health, messages, models, policyProbe, ready, SLO } from './lib/common.js';
import { sleep } from 'k6';

export const options = {
  vus: 1,
  duration: dur(30),
  thresholds: {
    ...SLO,
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
  },
};

export default function () {
  if (exec.vu.iterationInScenario === 0) ready();
  health();
  models();
  messages();
  messages({ stream: true });
  messages({ viaPath: true });
  chat();
  chat({ stream: true });
  policyProbe();
  controlPlane();
  sleep(0.5);
}
