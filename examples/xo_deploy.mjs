// Xen Orchestra's VM creation through its `xen-api` client (npm install xen-api), against xapid:
//   node examples/xo_deploy.mjs http://127.0.0.1:8080 "$(cat var/root-password)"
import { createClient } from 'xen-api'
const [url, password] = process.argv.slice(2)
const xapi = createClient({ url, allowUnauthorized: true, auth: { user: 'root', password } })
const results = []
async function step(name, fn) {
  try { const v = await fn(); results.push([name, 'ok']); return v }
  catch (e) { results.push([name, 'FAIL ' + (e.code || '') + ' ' + JSON.stringify(e.params || e.message)]); return undefined }
}
await xapi.connect()
await xapi.objectsFetched
const types = {}
for (const o of Object.values(xapi.objects.all)) types[o.$type] = (types[o.$type] || 0) + 1
console.log('objects by type', JSON.stringify(types))
const tpl = Object.values(xapi.objects.all).find(o => o.$type === 'VM' && o.is_a_template && o.name_label === 'Debian Bookworm 12')
const sr = xapi.pool.$default_SR
const vmRef = await step('VM.clone (fast)', () => xapi.callAsync('VM.clone', tpl.$ref, 'xo-vm'))
await step('set other_config disks', async () => {
  const oc = await xapi.call('VM.get_other_config', vmRef)
  await xapi.call('VM.remove_from_other_config', vmRef, 'disks')
  await xapi.call('VM.add_to_other_config', vmRef, 'disks', oc.disks.replace('sr=""', `sr="${sr.uuid}"`))
})
await step('VM.provision', () => xapi.callAsync('VM.provision', vmRef))
await step('VM.set_memory_limits', () => xapi.call('VM.set_memory_limits', vmRef, 536870912, 2147483648, 2147483648, 2147483648))
await step('VM.set_VCPUs_max', () => xapi.call('VM.set_VCPUs_max', vmRef, 2))
await step('VM.set_VCPUs_at_startup', () => xapi.call('VM.set_VCPUs_at_startup', vmRef, 2))
const net = Object.values(xapi.objects.all).find(o => o.$type === 'network')
await step('VIF.create', () => xapi.call('VIF.create', { device: '0', network: net.$ref, VM: vmRef, MAC: '', MTU: 1500, other_config: {}, qos_algorithm_type: '', qos_algorithm_params: {} }))
const vdi = await step('VDI.create', () => xapi.call('VDI.create', { name_label: 'xo data', name_description: '', SR: sr.$ref, virtual_size: 1073741824, type: 'user', sharable: false, read_only: false, other_config: {}, xenstore_data: {}, sm_config: {}, tags: [] }))
await step('VBD.create', async () => {
  const devs = await xapi.call('VM.get_allowed_VBD_devices', vmRef)
  return xapi.call('VBD.create', { VM: vmRef, VDI: vdi, userdevice: devs[0], bootable: false, mode: 'RW', type: 'Disk', unpluggable: true, empty: false, other_config: {}, qos_algorithm_type: '', qos_algorithm_params: {} })
})
await step('VM.start', () => xapi.callAsync('VM.start', vmRef, false, false))
await step('wait for guest metrics', async () => {
  for (let i = 0; i < 100; i++) { const gm = await xapi.call('VM.get_guest_metrics', vmRef); if (gm !== 'OpaqueRef:NULL') return; await new Promise(r => setTimeout(r, 100)) }
  throw new Error('no guest metrics')
})
const snap = await step('VM.snapshot', () => xapi.callAsync('VM.snapshot', vmRef, 'xo-snap', []))
await step('VM.checkpoint', () => xapi.callAsync('VM.checkpoint', vmRef, 'xo-cp'))
await step('VM.suspend', () => xapi.callAsync('VM.suspend', vmRef))
await step('VM.resume', () => xapi.callAsync('VM.resume', vmRef, false, false))
await step('VM.pool_migrate', async () => {
  const rec = await xapi.call('VM.get_record', vmRef)
  const host = Object.values(xapi.objects.all).find(o => o.$type === 'host' && o.$ref !== rec.resident_on)
  return xapi.callAsync('VM.pool_migrate', vmRef, host.$ref, { force: 'false' })
})
await step('VM.clean_shutdown', () => xapi.callAsync('VM.clean_shutdown', vmRef))
await step('VM.revert', () => xapi.callAsync('VM.revert', snap))
await step('VM.copy', () => xapi.callAsync('VM.copy', vmRef, 'xo-copy', sr.$ref))
await step('VM.destroy', () => xapi.call('VM.destroy', vmRef))
await step('allowed_operations cached', async () => {
  await xapi.barrier()
  const vm = Object.values(xapi.objects.all).find(o => o.$type === 'VM' && o.name_label === 'xo-copy')
  if (!vm.allowed_operations.includes('start')) throw new Error(JSON.stringify(vm.allowed_operations))
})
{ const t = {}; for (const o of Object.values(xapi.objects.all)) t[o.$type] = (t[o.$type] || 0) + 1; console.log('at the end', JSON.stringify(t)) }
for (const [n, r] of results) console.log(r.padEnd(6).slice(0, 60), n)
console.log('passed', results.filter(r => r[1] === 'ok').length, 'of', results.length)
await xapi.disconnect()
process.exit(0)
