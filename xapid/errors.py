"""The one failure type of xapid and the catalogue of XenAPI error codes.

Every refusal anywhere in the daemon is an :class:`ApiError` carrying the
XenAPI code and its string parameters.  The wire layer is the single place
that turns it into a ``Failure`` envelope; nothing else formats errors.
"""

from __future__ import annotations

# Codes used by xapid, with the datamodel's parameter labels (xe prints them).
# Source: ../shared/spec/wire.md 4.4 and ../shared/spec/ha.md 6, plus the
# design's four cluster-stack errors.
CATALOGUE: dict[str, tuple[str, ...]] = {
    "SESSION_AUTHENTICATION_FAILED": ("username", "reason"),
    "SESSION_INVALID": ("handle",),
    "HANDLE_INVALID": ("class", "handle"),
    "UUID_INVALID": ("type", "uuid"),
    "MESSAGE_METHOD_UNKNOWN": ("method",),
    "MESSAGE_PARAMETER_COUNT_MISMATCH": ("method", "expected", "received"),
    "MESSAGE_REMOVED": (),
    "INTERNAL_ERROR": ("message",),
    "MAP_DUPLICATE_KEY": ("type", "param_name", "uuid", "key"),
    "INVALID_VALUE": ("field", "value"),
    "VALUE_NOT_SUPPORTED": ("field", "value", "reason"),
    "OPERATION_NOT_ALLOWED": ("reason",),
    "NOT_IMPLEMENTED": ("function",),
    "RBAC_PERMISSION_DENIED": ("permission", "message"),
    "VM_BAD_POWER_STATE": ("vm", "expected", "actual"),
    "VM_IS_TEMPLATE": ("vm", "operation"),
    "SR_HAS_PBD": ("sr",),
    "SR_UNKNOWN_DRIVER": ("driver",),
    "SR_NOT_EMPTY": (),
    "PBD_EXISTS": ("sr", "host", "pbd"),
    "VDI_IN_USE": ("vdi", "operation"),
    "SR_FULL": ("requested", "maximum"),
    "HA_IS_ENABLED": (),
    "HA_NOT_ENABLED": (),
    "HA_ENABLE_IN_PROGRESS": (),
    "HA_DISABLE_IN_PROGRESS": (),
    "HA_FAILED_TO_FORM_LIVESET": (),
    "HA_HOST_CANNOT_ACCESS_STATEFILE": (),
    "HOST_OFFLINE": ("host",),
    "HOST_IS_SLAVE": ("Master IP address",),
    "SR_HAS_NO_PBDS": ("sr",),
    "CANNOT_CREATE_STATE_FILE": (),
    "SR_SOURCE_SPACE_INSUFFICIENT": ("sr",),
    "SR_OPERATION_NOT_SUPPORTED": ("sr",),
    "INCOMPATIBLE_STATEFILE_SR": ("SR type",),
    "INCOMPATIBLE_CLUSTER_STACK_ACTIVE": ("cluster_stack",),
    "UNKNOWN_CLUSTER_STACK": ("cluster_stack",),
    "CLUSTER_STACK_CONSTRAINT": ("ref", "cluster_stack"),
    "HOST_NOT_ENOUGH_FREE_MEMORY": ("needed", "available"),
    "HOST_DISABLED": ("host",),
    "NO_HOSTS_AVAILABLE": (),
    "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN": (),
    "HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED": ("SR",),
    "HA_CONSTRAINT_VIOLATION_NETWORK_NOT_SHARED": ("network",),
    "CANNOT_RESET_CONTROL_DOMAIN": ("vm",),
    "VM_HAS_PCI_ATTACHED": ("vm",),
    "DEVICE_ALREADY_ATTACHED": ("device",),
    "DEVICE_DETACH_REJECTED": ("type", "ref", "msg"),
    "EVENT_FROM_TOKEN_PARSE_FAILURE": ("token",),
    "TASK_CANCELLED": ("task",),
    # Host maintenance and power (xapi's datamodel_errors.ml).
    "HOST_NOT_DISABLED": (),
    "HOST_DISABLED_UNTIL_REBOOT": ("host",),
    "HOST_DISABLED_INDEFINITELY": ("host",),
    "HOST_STILL_BOOTING": (),
    "HOST_IS_LIVE": ("host",),
    "HOST_HAS_RESIDENT_VMS": ("host",),
    "CANNOT_EVACUATE_HOST": ("errors",),
    "XAPI_HOOK_FAILED": ("hook_name", "reason", "stdout", "exit_code"),
    "HOST_IN_EMERGENCY_MODE": (),
    "HOST_EVACUATE_VM_NOT_HA_PROTECTED": ("vm",),
    "VM_REQUIRES_SR": ("vm", "sr"),
    "VM_REQUIRES_NETWORK": ("vm", "network"),
    "OTHER_OPERATION_IN_PROGRESS": ("class", "object", "operation_type", "operation_ref"),
    "HA_LOST_STATEFILE": (),
    "HA_HEARTBEAT_DAEMON_STARTUP_FAILED": (),
    "HA_POOL_IS_ENABLED_BUT_HOST_IS_DISABLED": (),
    # VM, VBD, VIF and VDI operations (datamodel_errors.ml).
    "OPERATION_BLOCKED": ("ref", "code"),
    "VM_IS_SNAPSHOT": ("vm", "operation"),
    "VM_LACKS_FEATURE": ("vm",),
    "VM_NON_SUSPENDABLE": ("vm", "reason"),
    "VM_IS_IMMOBILE": ("VM",),
    "VM_IS_USING_NESTED_VIRT": ("VM",),
    "VM_IS_PROTECTED": ("vm",),
    "VM_MISSING_PV_DRIVERS": ("vm",),
    "ONLY_PROVISION_TEMPLATE": (),
    "ONLY_REVERT_SNAPSHOT": (),
    "VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED": ("vm", "error"),
    "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION": (),
    "VM_HAS_VGPU": ("vm",),
    "VM_HAS_VUSBS": ("VM",),
    "VM_IS_PART_OF_AN_APPLIANCE": ("vm", "appliance"),
    "VM_ASSIGNED_TO_PROTECTION_POLICY": ("vm", "vmpp"),
    "VM_ASSIGNED_TO_SNAPSHOT_SCHEDULE": ("vm", "vmss"),
    "NOT_SYSTEM_DOMAIN": ("vm",),
    "VTPM_MAX_AMOUNT_REACHED": ("amount",),
    "FEATURE_RESTRICTED": (),
    "HOST_NAME_INVALID": ("reason",),
    "VM_NO_SUSPEND_SR": ("vm",),
    "VM_CHECKPOINT_SUSPEND_FAILED": ("vm",),
    "VM_REVERT_FAILED": ("vm", "snapshot"),
    "VM_MIGRATE_CONTACT_REMOTE_SERVICE_FAILED": (),
    "HOST_NOT_LIVE": (),
    "HOST_NOT_ENOUGH_PCPUS": ("vcpus", "pcpus"),
    "MEMORY_CONSTRAINT_VIOLATION_ORDER": (),
    "MEMORY_CONSTRAINT_VIOLATION_MAXPIN": ("reason",),
    "VBD_NOT_UNPLUGGABLE": ("vbd",),
    "VBD_NOT_REMOVABLE_MEDIA": ("vbd",),
    "VBD_IS_EMPTY": ("vbd",),
    "VBD_NOT_EMPTY": ("vbd",),
    "VBD_CDS_MUST_BE_READONLY": (),
    "DISK_VBD_MUST_BE_READWRITE_FOR_HVM": ("vbd",),
    "DEVICE_ALREADY_DETACHED": ("device",),
    "DEVICE_ALREADY_EXISTS": ("device",),
    "INVALID_DEVICE": ("device",),
    "MAC_INVALID": ("MAC",),
    "INVALID_IP_ADDRESS_SPECIFIED": ("parameter",),
    "VDI_READONLY": ("vdi",),
    "VDI_NOT_MANAGED": ("vdi",),
    "VDI_INCOMPATIBLE_TYPE": ("vdi", "type"),
    "VDI_IS_SHARABLE": ("vdi",),
    "VDI_HAS_RRDS": ("vdi",),
    "VDI_IS_A_PHYSICAL_DEVICE": ("vdi",),
    "VDI_TOO_SMALL": ("vdi", "minimum size"),
    "VDI_MISSING": ("sr", "vdi"),
    "LOCATION_NOT_UNIQUE": ("SR", "location"),
    "SR_NO_PBDS": ("sr",),
    "NETWORK_CONTAINS_PIF": ("pifs",),
    "NETWORK_CONTAINS_VIF": ("vifs",),
    "XENAPI_MISSING_PLUGIN": ("name",),
    # Codes of the VM surface, clustering and the HTTP handlers (labels from xapi's datamodel_errors.ml).
    "CANNOT_ADD_VLAN_TO_BOND_SLAVE": ("PIF",),
    "CANNOT_DESTROY_SYSTEM_NETWORK": ("network",),
    "CLIENT_ERROR": (),
    "CLUSTERING_DISABLED": ("cluster_host",),
    "CLUSTER_DOES_NOT_HAVE_ONE_NODE": ("number_of_nodes",),
    "CLUSTER_HOST_IS_LAST": ("cluster_host",),
    "CLUSTER_STACK_IN_USE": ("cluster_stack",),
    "NO_COMPATIBLE_CLUSTER_HOST": ("host",),
    "CLUSTER_HOST_NOT_JOINED": ("cluster_host",),
    "DEFAULT_SR_NOT_FOUND": ("sr",),
    "DUPLICATE_VM": ("vm",),
    "EVENTS_LOST": (),
    "IMPORT_ERROR": ("msg",),
    "IMPORT_ERROR_PREMATURE_EOF": (),
    "IMPORT_INCOMPATIBLE_VERSION": (),
    "INVALID_CLUSTER_STACK": ("cluster_stack",),
    "NETWORK_ALREADY_CONNECTED": ("network", "connected PIF"),
    "NETWORK_UNMANAGED": ("network",),
    "NETWORK_INCOMPATIBLE_PURPOSES": ("new_purpose", "conflicting_purpose"),
    "NO_CLUSTER_HOSTS_REACHABLE": ("cluster",),
    "PIF_ALLOWS_UNPLUG": ("PIF",),
    "PIF_HAS_NO_NETWORK_CONFIGURATION": ("PIF",),
    "PIF_IS_MANAGEMENT_INTERFACE": ("PIF",),
    "PIF_IS_PHYSICAL": ("PIF",),
    "PIF_IS_VLAN": ("PIF",),
    "PIF_NOT_ATTACHED_TO_HOST": ("pif", "host"),
    "PIF_UNMANAGED": ("PIF",),
    "PIF_VLAN_EXISTS": ("PIF",),
    "REQUIRED_PIF_IS_UNPLUGGED": ("PIF",),
    "SESSION_NOT_REGISTERED": ("handle",),
    "SR_BACKEND_FAILURE": ("status", "stdout", "stderr"),
    "SR_BACKEND_FAILURE_79": ("status", "stdout", "stderr"),
    "SR_BACKEND_FAILURE_460": ("status", "stdout", "stderr"),
    "VDI_NO_CBT_METADATA": ("vdi",),
    "VDI_CBT_ENABLED": ("vdi",),
    "VDI_IO_ERROR": (),
    "VDI_TOO_LARGE": ("vdi", "maximum size"),
    "VLAN_TAG_INVALID": ("VLAN",),
}

# Human descriptions for the xe client (wire.md 8.6).
DESCRIPTIONS: dict[str, str] = {
    "HANDLE_INVALID": "You gave an invalid object reference.  The object may have recently been deleted.",
    "UUID_INVALID": "The uuid you supplied was invalid.",
    "SESSION_INVALID": "You gave an invalid session reference.",
    "HA_IS_ENABLED": "The operation could not be performed because HA is enabled on the Pool",
    "HA_NOT_ENABLED": "The operation could not be performed because HA is not enabled on the Pool",
    "HOST_OFFLINE": "You attempted an operation which involves a host which could not be contacted.",
    "HOST_IS_SLAVE": "You cannot make regular API calls directly on a supporter. Please pass API calls via the"
                     " coordinator host.",
    "SR_HAS_NO_PBDS": "The SR has no attached PBDs",
    "CANNOT_CREATE_STATE_FILE": "An HA statefile could not be created, perhaps because no SR with the appropriate capability was found.",
    "INCOMPATIBLE_STATEFILE_SR": "The specified SR is incompatible with the selected HA cluster stack.",
    "INCOMPATIBLE_CLUSTER_STACK_ACTIVE": "This operation cannot be performed, because it is incompatible with the currently active HA cluster stack.",
    "UNKNOWN_CLUSTER_STACK": "The requested cluster stack does not exist.",
    "CLUSTER_STACK_CONSTRAINT": "HA cannot be enabled with the provided cluster stack because some third-party software is already active which requires a different cluster stack setting.",
    "VM_BAD_POWER_STATE": "You attempted an operation on a VM that was not in an appropriate power state at the time; for example, you attempted to start a VM that was already running.  The parameters returned are the VM's handle, and the expected and actual VM state at the time of the call.",
    "SR_HAS_PBD": "The SR is still connected to a host via a PBD. It cannot be destroyed or forgotten.",
    "HOST_NOT_ENOUGH_FREE_MEMORY": "Not enough server memory is available to perform this operation.",
    "HOST_DISABLED": "The specified server is disabled.",
    "NO_HOSTS_AVAILABLE": "There were no servers available to complete the specified operation.",
    "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN": "This operation cannot be performed because it would invalidate VM failover planning such that the system would be unable to guarantee to restart protected VMs after a Host failure.",
    "HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED": "This operation cannot be performed because the referenced SR is not properly shared. The SR must both be marked as shared and a currently_attached PBD must exist for each host.",
    "HA_CONSTRAINT_VIOLATION_NETWORK_NOT_SHARED": "This operation cannot be performed because the referenced network is not properly shared. The network must either be entirely virtual or must be physically present via a currently_attached PIF on every host.",
    "HOST_NOT_DISABLED": "This operation cannot be performed because the host is not disabled. Please disable the host and then try again.",
    "HOST_DISABLED_UNTIL_REBOOT": "The specified server is disabled and cannot be re-enabled until after it has rebooted.",
    "HOST_IS_LIVE": "This operation cannot be completed because the server is still live.",
    "HOST_HAS_RESIDENT_VMS": "This server cannot be forgotten because there are user VMs still running.",
    "CANNOT_EVACUATE_HOST": "This server cannot be evacuated.",
    "VDI_NO_CBT_METADATA": "The requested operation is not allowed because the specified VDI does not have changed "
                           "block tracking metadata.",
    "VDI_CBT_ENABLED": "The requested operation is not allowed for VDIs with CBT enabled or VMs having such VDIs, "
                       "and CBT is enabled for the specified VDI.",
    "VDI_INCOMPATIBLE_TYPE": "This operation cannot be performed because the specified VDI is of an incompatible "
                             "type (eg: an HA statefile cannot be attached to a guest)",
    "XAPI_HOOK_FAILED": "3rd party xapi hook failed",
    "HOST_STILL_BOOTING": "The host toolstack is still initialising. Please wait.",
    "HOST_EVACUATE_VM_NOT_HA_PROTECTED": "The host cannot be evacuated because HA is enabled on the pool and a VM running on it is not HA-protected (its ha_restart_priority is not set to 'restart'). Set the VM's ha_restart_priority to 'restart', shut down or suspend the VM, or disable HA on the pool before evacuating the host.",
    "HA_LOST_STATEFILE": "This server lost access to the HA statefile.",
    "INTERNAL_ERROR": "The server failed to handle your request, due to an internal error. The given message may give details useful for debugging the problem.",
}


class ApiError(Exception):
    """A XenAPI failure: ``code`` plus its parameters, all strings on the wire."""

    def __init__(self, code: str, *params: object) -> None:
        self.code = code
        self.params = [str(p) for p in params]
        super().__init__(code, *self.params)

    @property
    def description(self) -> list[str]:
        """The ``ErrorDescription`` list: ``[code, param1, ...]``."""
        return [self.code, *self.params]

    def __str__(self) -> str:
        return str(self.description)


def internal(message: str) -> ApiError:
    """An ``INTERNAL_ERROR`` with a short human message."""
    return ApiError("INTERNAL_ERROR", message)
