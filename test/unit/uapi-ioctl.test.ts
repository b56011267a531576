import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  BackendFeature,
  backendFeatureMask,
  backendFeatureNames,
  Ioctl,
  KNOWN_BACKEND_FEATURES,
} from '../../src/uapi/index.ts';

// Values as the C preprocessor computes them from include/uapi/linux/vhost.h on x86_64.
const KNOWN: [keyof typeof Ioctl, number][] = [
  ['VHOST_GET_FEATURES', 0x8008af00],
  ['VHOST_SET_FEATURES', 0x4008af00],
  ['VHOST_SET_OWNER', 0xaf01],
  ['VHOST_RESET_OWNER', 0xaf02],
  ['VHOST_SET_VRING_NUM', 0x4008af10],
  ['VHOST_SET_VRING_ADDR', 0x4028af11],
  ['VHOST_SET_VRING_BASE', 0x4008af12],
  ['VHOST_GET_VRING_BASE', 0xc008af12],
  ['VHOST_SET_VRING_KICK', 0x4008af20],
  ['VHOST_SET_VRING_CALL', 0x4008af21],
  ['VHOST_SET_BACKEND_FEATURES', 0x4008af25],
  ['VHOST_GET_BACKEND_FEATURES', 0x8008af26],
  ['VHOST_VDPA_GET_DEVICE_ID', 0x8004af70],
  ['VHOST_VDPA_GET_STATUS', 0x8001af71],
  ['VHOST_VDPA_SET_STATUS', 0x4001af72],
  ['VHOST_VDPA_GET_CONFIG', 0x8008af73],
  ['VHOST_VDPA_SET_CONFIG', 0x4008af74],
  ['VHOST_VDPA_SET_VRING_ENABLE', 0x4008af75],
  ['VHOST_VDPA_GET_VRING_NUM', 0x8002af76],
  ['VHOST_VDPA_GET_IOVA_RANGE', 0x8010af78],
  ['VHOST_VDPA_GET_CONFIG_SIZE', 0x8004af79],
  ['VHOST_VDPA_GET_AS_NUM', 0x8004af7a],
  ['VHOST_VDPA_GET_VRING_GROUP', 0xc008af7b],
  ['VHOST_VDPA_SET_GROUP_ASID', 0x4008af7c],
  ['VHOST_VDPA_SUSPEND', 0xaf7d],
  ['VHOST_VDPA_RESUME', 0xaf7e],
  ['VHOST_VDPA_GET_VQS_COUNT', 0x8004af80],
  ['VHOST_VDPA_GET_GROUP_NUM', 0x8004af81],
];

for (const [name, value] of KNOWN) {
  test(`${name} is 0x${value.toString(16)}`, () => {
    assert.equal(Ioctl[name], value);
  });
}

test('backend feature bits follow vhost_types.h', () => {
  assert.equal(BackendFeature.IOTLB_MSG_V2, 1);
  assert.equal(BackendFeature.IOTLB_PERSIST, 8);
  assert.equal(backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID'), 0xen);
  assert.equal(KNOWN_BACKEND_FEATURES, 0x1fen);
  assert.deepEqual(backendFeatureNames(0xen | (1n << 40n)), [
    'IOTLB_MSG_V2',
    'IOTLB_BATCH',
    'IOTLB_ASID',
    'bit40',
  ]);
});
