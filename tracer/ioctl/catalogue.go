package ioctl

// spec is one entry of the catalogue; its number comes from znumbers.go
// (generated from the kernel's headers by mknumbers.sh).
type spec struct {
	name   string
	fd     FD
	layout *layout
}

// The fields shared by several requests.
var (
	memRegion = []fieldSpec{
		u32("slot", 0, "memslot id (the low 16 bits of the kernel's slot)").packed(0, 16),
		u32("as_id", 0, "address space: 0 normal, 1 SMM (the high 16 bits of slot)").packed(16, 16),
		u32("flags", 4, "KVM_MEM_* flags: KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD").named(memFlagNames),
		u64("guest_phys_addr", 8, "guest-physical start of the slot"),
		u64("memory_size", 16, "bytes; 0 deletes the slot"),
		u64("userspace_addr", 24, "QEMU's virtual address of the slot's memory"),
	}
	irqLevel = ptr(8,
		u32("irq", 0, "GSI of the interrupt line"),
		u32("level", 4, "line level: 1 raised, 0 lowered"))
	deviceAttr = ptr(24,
		u32("flags", 0, "reserved, 0"),
		u32("group", 4, "attribute group (device-specific)"),
		u64("attr", 8, "attribute within the group"),
		u64("addr", 16, "QEMU address of the attribute's value"))
	msrs = func(data bool) *layout {
		f := []fieldSpec{
			u32("nmsrs", 0, "number of MSR entries (the kernel refuses 256 or more)"),
			u32("index", 0, "the MSR indices, e.g. 0xc0000082 (LSTAR)").listOf(0),
		}
		if data {
			f = append(f, u64("data", 0, "the values written, in the order of index").listOf(8))
		}
		// arch/x86/kvm/x86.c msr_io: nmsrs >= MAX_IO_MSRS (256) is E2BIG.
		return ptr(8, f...).with(entries{off: 8, stride: 16, countField: "nmsrs", max: 255})
	}
	ifreqFlags = ptr(18, fieldSpec{name: "flags", doc: "ifr_flags: IFF_TAP (0x2), IFF_NO_PI (0x1000), IFF_VNET_HDR (0x4000), IFF_MULTI_QUEUE (0x100)", off: 16, size: 2})
)

// catalogue lists the requests kvmscope knows: every KVM request QEMU 7.2
// and later issue on x86-64 (docs/policy.md has the survey), and the
// terminal, tap, vhost and block requests of its host devices.
var catalogue = []spec{
	// /dev/kvm
	{"KVM_GET_API_VERSION", FDKVM, nil},
	{"KVM_CREATE_VM", FDKVM, value("type", "machine type: 0 default, KVM_X86_SW_PROTECTED_VM, KVM_X86_SEV_VM, ...")},
	{"KVM_GET_MSR_INDEX_LIST", FDKVM, nil},
	{"KVM_GET_MSR_FEATURE_INDEX_LIST", FDKVM, nil},
	{"KVM_GET_VCPU_MMAP_SIZE", FDKVM, nil},
	{"KVM_GET_SUPPORTED_CPUID", FDKVM, nil},
	{"KVM_GET_EMULATED_CPUID", FDKVM, nil},
	{"KVM_X86_GET_MCE_CAP_SUPPORTED", FDKVM, nil},

	// Issued on more than one kind of fd.
	{"KVM_CHECK_EXTENSION", FDAny, &layout{fields: []fieldSpec{u64("cap", 0, "the KVM_CAP_* asked about").named(capNames)}}},
	{"KVM_ENABLE_CAP", FDAny, ptr(8,
		u32("cap", 0, "the KVM_CAP_* enabled").named(capNames),
		u32("flags", 4, "capability-specific flags"),
		u64("args", 0, "the four capability-specific arguments").listOf(0),
	).with(entries{off: 8, stride: 8, count: 4})},
	{"KVM_GET_MSRS", FDAny, msrs(false)},
	{"KVM_GET_DEVICE_ATTR", FDAny, deviceAttr},
	{"KVM_SET_DEVICE_ATTR", FDAny, deviceAttr},
	{"KVM_HAS_DEVICE_ATTR", FDAny, deviceAttr},
	{"KVM_GET_STATS_FD", FDAny, nil},
	{"KVM_GET_SUPPORTED_HV_CPUID", FDAny, nil},

	// The VM fd.
	{"KVM_SET_USER_MEMORY_REGION", FDVM, ptr(32, memRegion...)},
	{"KVM_SET_USER_MEMORY_REGION2", FDVM, ptr(48, append(append([]fieldSpec(nil), memRegion...),
		u64("guest_memfd_offset", 32, "offset of the slot in its guest_memfd"),
		u32("guest_memfd", 40, "the guest_memfd fd (with KVM_MEM_GUEST_MEMFD)"))...)},
	{"KVM_CREATE_VCPU", FDVM, value("vcpu_id", "the new vCPU's id (its APIC id on x86)")},
	{"KVM_SET_TSS_ADDR", FDVM, value("addr", "guest-physical address of the 3-page TSS region")},
	{"KVM_SET_IDENTITY_MAP_ADDR", FDVM, ptr(8, u64("addr", 0, "guest-physical address of the identity-map page"))},
	{"KVM_CREATE_IRQCHIP", FDVM, nil},
	{"KVM_CREATE_PIT2", FDVM, ptr(4, u32("flags", 0, "KVM_PIT_SPEAKER_DUMMY (1)"))},
	{"KVM_GET_IRQCHIP", FDVM, ptr(4, u32("chip_id", 0, "0 PIC master, 1 PIC slave, 2 IOAPIC"))},
	{"KVM_SET_IRQCHIP", FDVM, ptr(4, u32("chip_id", 0, "0 PIC master, 1 PIC slave, 2 IOAPIC"))},
	{"KVM_GET_PIT2", FDVM, nil},
	{"KVM_SET_PIT2", FDVM, nil},
	{"KVM_IRQ_LINE", FDVM, irqLevel},
	{"KVM_IRQ_LINE_STATUS", FDVM, irqLevel},
	{"KVM_GET_CLOCK", FDVM, nil},
	{"KVM_SET_CLOCK", FDVM, ptr(16, u64("clock", 0, "kvmclock value, ns"), u32("flags", 8, "KVM_CLOCK_* flags"))},
	{"KVM_SET_GSI_ROUTING", FDVM, ptr(8, u32("nr", 0, "number of routing entries"), u32("flags", 4, "reserved, 0"))},
	{"KVM_IRQFD", FDVM, ptr(16,
		u32("fd", 0, "the eventfd"),
		u32("gsi", 4, "the GSI it raises"),
		u32("flags", 8, "KVM_IRQFD_FLAG_DEASSIGN (1), KVM_IRQFD_FLAG_RESAMPLE (2)"),
		u32("resamplefd", 12, "eventfd signalled on EOI, with RESAMPLE"))},
	{"KVM_IOEVENTFD", FDVM, ptr(28,
		u64("datamatch", 0, "value a write must have, with KVM_IOEVENTFD_FLAG_DATAMATCH"),
		u64("addr", 8, "guest-physical MMIO address or I/O port"),
		u32("len", 16, "access length: 0 (any), 1, 2, 4 or 8"),
		u32("fd", 20, "the eventfd"),
		u32("flags", 24, "KVM_IOEVENTFD_FLAG_*: DATAMATCH, PIO, DEASSIGN, VIRTIO_CCW_NOTIFY").named(ioeventfdFlagNames))},
	{"KVM_SIGNAL_MSI", FDVM, ptr(20,
		u32("address_lo", 0, "MSI address, low 32 bits"),
		u32("address_hi", 4, "MSI address, high 32 bits"),
		u32("data", 8, "MSI data"),
		u32("flags", 12, "KVM_MSI_VALID_DEVID (1)"),
		u32("devid", 16, "device id, with KVM_MSI_VALID_DEVID"))},
	{"KVM_REGISTER_COALESCED_MMIO", FDVM, coalesced()},
	{"KVM_UNREGISTER_COALESCED_MMIO", FDVM, coalesced()},
	{"KVM_GET_DIRTY_LOG", FDVM, ptr(4, u32("slot", 0, "the memslot (address space in the high 16 bits)"))},
	{"KVM_CLEAR_DIRTY_LOG", FDVM, ptr(16,
		u32("slot", 0, "the memslot (address space in the high 16 bits)"),
		u32("num_pages", 4, "pages to clear"),
		u64("first_page", 8, "first page, in the slot"))},
	{"KVM_RESET_DIRTY_RINGS", FDVM, nil},
	{"KVM_SET_BOOT_CPU_ID", FDVM, value("vcpu_id", "the boot vCPU's id")},
	{"KVM_X86_SET_MSR_FILTER", FDVM, ptr(4, u32("flags", 0, "KVM_MSR_FILTER_DEFAULT_ALLOW (0) or _DENY (1)"))},
	{"KVM_SET_PMU_EVENT_FILTER", FDVM, ptr(8, u32("action", 0, "KVM_PMU_EVENT_ALLOW (0) or _DENY (1)"), u32("nevents", 4, "number of events listed"))},
	{"KVM_REINJECT_CONTROL", FDVM, nil},
	{"KVM_CREATE_DEVICE", FDVM, ptr(12,
		u32("type", 0, "the KVM_DEV_TYPE_* created").named(deviceTypeNames),
		u32("fd", 4, "output: the device's fd"),
		u32("flags", 8, "KVM_CREATE_DEVICE_TEST (1) only asks whether the type exists"))},
	{"KVM_MEMORY_ENCRYPT_OP", FDVM, ptr(4, u32("id", 0, "the SEV or TDX command (KVM_SEV_*, KVM_TDX_*)"))},
	{"KVM_MEMORY_ENCRYPT_REG_REGION", FDVM, ptr(16, u64("addr", 0, "QEMU address of the region"), u64("size", 8, "bytes"))},
	{"KVM_MEMORY_ENCRYPT_UNREG_REGION", FDVM, ptr(16, u64("addr", 0, "QEMU address of the region"), u64("size", 8, "bytes"))},
	{"KVM_CREATE_GUEST_MEMFD", FDVM, ptr(16, u64("size", 0, "bytes of guest_memfd"), u64("flags", 8, "GUEST_MEMFD_FLAG_*"))},
	{"KVM_SET_MEMORY_ATTRIBUTES", FDVM, ptr(32,
		u64("address", 0, "guest-physical start"),
		u64("size", 8, "bytes"),
		u64("attributes", 16, "KVM_MEMORY_ATTRIBUTE_PRIVATE (8)"),
		u64("flags", 24, "reserved, 0"))},
	{"KVM_XEN_HVM_CONFIG", FDVM, nil},

	// vCPU fds.
	{"KVM_RUN", FDVCPU, nil},
	{"KVM_GET_REGS", FDVCPU, nil},
	{"KVM_SET_REGS", FDVCPU, nil},
	{"KVM_GET_SREGS", FDVCPU, nil},
	{"KVM_SET_SREGS", FDVCPU, nil},
	{"KVM_GET_SREGS2", FDVCPU, nil},
	{"KVM_SET_SREGS2", FDVCPU, nil},
	{"KVM_GET_FPU", FDVCPU, nil},
	{"KVM_SET_FPU", FDVCPU, nil},
	{"KVM_GET_XSAVE", FDVCPU, nil},
	{"KVM_GET_XSAVE2", FDVCPU, nil},
	{"KVM_SET_XSAVE", FDVCPU, nil},
	{"KVM_GET_XCRS", FDVCPU, nil},
	{"KVM_SET_XCRS", FDVCPU, nil},
	{"KVM_SET_MSRS", FDVCPU, msrs(true)},
	{"KVM_SET_CPUID", FDVCPU, ptr(4, u32("nent", 0, "number of CPUID entries"))},
	{"KVM_SET_CPUID2", FDVCPU, ptr(4, u32("nent", 0, "number of CPUID entries"))},
	{"KVM_GET_CPUID2", FDVCPU, nil},
	{"KVM_GET_LAPIC", FDVCPU, nil},
	{"KVM_SET_LAPIC", FDVCPU, nil},
	{"KVM_GET_MP_STATE", FDVCPU, nil},
	{"KVM_SET_MP_STATE", FDVCPU, ptr(4, u32("mp_state", 0, "KVM_MP_STATE_*: 0 runnable, 1 uninitialized, 2 init received, 3 halted, ..."))},
	{"KVM_GET_VCPU_EVENTS", FDVCPU, nil},
	{"KVM_SET_VCPU_EVENTS", FDVCPU, nil},
	{"KVM_GET_DEBUGREGS", FDVCPU, nil},
	{"KVM_SET_DEBUGREGS", FDVCPU, nil},
	{"KVM_SET_GUEST_DEBUG", FDVCPU, ptr(8,
		u32("control", 0, "KVM_GUESTDBG_* bits: ENABLE, SINGLESTEP, USE_SW_BP, USE_HW_BP, INJECT_DB, INJECT_BP, BLOCKIRQ").named(guestDebugNames),
		u64("debugreg", 0, "the eight debug registers DR0-DR7").listOf(0),
	).with(entries{off: 8, stride: 8, count: 8})},
	{"KVM_INTERRUPT", FDVCPU, ptr(4, u32("irq", 0, "the vector injected"))},
	{"KVM_NMI", FDVCPU, nil},
	{"KVM_SMI", FDVCPU, nil},
	{"KVM_TRANSLATE", FDVCPU, ptr(8, u64("linear_address", 0, "the guest-virtual address translated"))},
	{"KVM_X86_SETUP_MCE", FDVCPU, ptr(8, u64("mcg_cap", 0, "MCG_CAP: the bank count in bits 0-7, and capability bits"))},
	{"KVM_X86_SET_MCE", FDVCPU, ptr(33, u64("status", 0, "MCi_STATUS of the injected machine check"), u64("addr", 8, "MCi_ADDR"), fieldSpec{name: "bank", doc: "the bank", off: 32, size: 1})},
	{"KVM_TPR_ACCESS_REPORTING", FDVCPU, ptr(4, u32("enabled", 0, "1 reports TPR accesses"))},
	{"KVM_SET_VAPIC_ADDR", FDVCPU, ptr(8, u64("vapic_addr", 0, "guest-physical address of the VAPIC page"))},
	{"KVM_GET_TSC_KHZ", FDVCPU, nil},
	{"KVM_SET_TSC_KHZ", FDVCPU, value("khz", "the guest's TSC frequency, kHz")},
	{"KVM_KVMCLOCK_CTRL", FDVCPU, nil},
	{"KVM_SET_SIGNAL_MASK", FDVCPU, nil},
	{"KVM_GET_NESTED_STATE", FDVCPU, nil},
	{"KVM_SET_NESTED_STATE", FDVCPU, nil},
	{"KVM_GET_ONE_REG", FDVCPU, nil},
	{"KVM_SET_ONE_REG", FDVCPU, nil},

	// Terminals (QEMU's stdio and -chardev pty).
	{"TCGETS", FDAny, nil},
	{"TCSETS", FDAny, nil},
	{"TCSETSW", FDAny, nil},
	{"TCSETSF", FDAny, nil},
	{"TIOCGWINSZ", FDAny, nil},
	{"TIOCSWINSZ", FDAny, nil},
	{"TIOCGPTN", FDAny, nil},
	{"TIOCSPTLCK", FDAny, nil},
	{"TIOCGPTPEER", FDAny, nil},
	{"FIONBIO", FDAny, nil},
	{"FIONREAD", FDAny, nil},
	{"FIOCLEX", FDAny, nil},
	{"FIONCLEX", FDAny, nil},

	// Tap devices (-netdev tap).
	{"TUNSETIFF", FDAny, ifreqFlags},
	{"TUNGETIFF", FDAny, nil},
	{"TUNGETFEATURES", FDAny, nil},
	{"TUNSETVNETHDRSZ", FDAny, nil},
	{"TUNGETVNETHDRSZ", FDAny, nil},
	{"TUNSETOFFLOAD", FDAny, value("flags", "TUN_F_* offload flags")},
	{"TUNSETSNDBUF", FDAny, nil},
	{"TUNSETQUEUE", FDAny, ifreqFlags},
	{"TUNSETVNETLE", FDAny, nil},
	{"TUNSETVNETBE", FDAny, nil},

	// vhost (-netdev tap,vhost=on, vhost-vsock).
	{"VHOST_GET_FEATURES", FDAny, nil},
	{"VHOST_SET_FEATURES", FDAny, nil},
	{"VHOST_GET_BACKEND_FEATURES", FDAny, nil},
	{"VHOST_SET_BACKEND_FEATURES", FDAny, nil},
	{"VHOST_SET_OWNER", FDAny, nil},
	{"VHOST_RESET_OWNER", FDAny, nil},
	{"VHOST_SET_MEM_TABLE", FDAny, ptr(4, u32("nregions", 0, "number of memory regions the vhost worker may access"))},
	{"VHOST_SET_LOG_BASE", FDAny, nil},
	{"VHOST_SET_LOG_FD", FDAny, nil},
	{"VHOST_SET_VRING_NUM", FDAny, nil},
	{"VHOST_SET_VRING_ADDR", FDAny, nil},
	{"VHOST_SET_VRING_BASE", FDAny, nil},
	{"VHOST_GET_VRING_BASE", FDAny, nil},
	{"VHOST_SET_VRING_KICK", FDAny, nil},
	{"VHOST_SET_VRING_CALL", FDAny, nil},
	{"VHOST_SET_VRING_ERR", FDAny, nil},
	{"VHOST_NET_SET_BACKEND", FDAny, ptr(8, u32("index", 0, "the virtqueue"), u32("fd", 4, "the tap fd (-1 detaches)"))},

	// Block devices and files (-drive on a device or a sparse image).
	{"BLKGETSIZE64", FDAny, nil},
	{"BLKSSZGET", FDAny, nil},
	{"BLKPBSZGET", FDAny, nil},
	{"BLKIOMIN", FDAny, nil},
	{"BLKIOOPT", FDAny, nil},
	{"BLKROGET", FDAny, nil},
	{"BLKFLSBUF", FDAny, nil},
	{"BLKDISCARD", FDAny, nil},
	{"BLKZEROOUT", FDAny, nil},
	{"FS_IOC_FIEMAP", FDAny, nil},
}

func coalesced() *layout {
	return ptr(16,
		u64("addr", 0, "guest-physical address (or port, with pio) of the zone"),
		u32("size", 8, "bytes"),
		u32("pio", 12, "1 for an I/O-port zone"))
}
