package launch

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
	"github.com/kvmscope/kvmscope/tracer/kvmprobe"
	"github.com/kvmscope/kvmscope/tracer/policy"
	"github.com/rs/zerolog"
)

// guestDebugCalls are the KVM_SET_GUEST_DEBUG calls QEMU 7.2's gdbstub
// makes on a vCPU's thread for an action inside the guest
// (kvm_update_guest_debug, kvm_arch_update_guest_debug in
// target/i386/kvm/kvm.c): a hardware breakpoint in DR0 (DR7 0x602: L0,
// execute, one byte), a step with interrupts blocked (the action removes
// its breakpoint for the step), and control 0 when the last breakpoint
// goes and at detach.
var guestDebugCalls = []struct {
	control uint32
	dr0     uint64
	dr7     uint64
}{
	{control: 0x1 | 0x20000, dr0: 0xffffffff81000000, dr7: 0x602}, // ENABLE|USE_HW_BP
	{control: 0x1 | 0x2 | 0x100000},                               // ENABLE|SINGLESTEP|BLOCKIRQ
	{control: 0},
}

// guestDebugRefused says why the ioctl policy p, enforced on QEMU, would
// make QEMU's gdbstub fail under KVM (a deny: its breakpoints would not
// be set, its steps not taken) or end QEMU (a kill), or nil. The calls
// are decided as QEMU would issue them; a rule conditioned on the exact
// breakpoint address could still decide otherwise, and its deny then
// fails the action's breakpoint with QEMU's error.
func guestDebugRefused(p *policy.Policy) error {
	if p == nil {
		return nil
	}
	req, ok := ioctl.Lookup("KVM_SET_GUEST_DEBUG")
	if !ok {
		return errors.New("KVM_SET_GUEST_DEBUG missing from the ioctl catalogue")
	}
	cmd := req.Cmd
	const argAddr = 0x7f0000001000 // where QEMU's struct would be
	for _, c := range guestDebugCalls {
		var b [72]byte // struct kvm_guest_debug
		binary.LittleEndian.PutUint32(b[0:], c.control)
		binary.LittleEndian.PutUint64(b[8:], c.dr0)
		binary.LittleEndian.PutUint64(b[8+7*8:], c.dr7)
		d := p.Decide(&policy.Call{
			Cmd: cmd, Arg: argAddr, Thread: policy.ThreadVCPU,
			FD: func() (string, error) { return "anon_inode:kvm-vcpu:0", nil },
			Args: func() (*ioctl.Args, error) {
				a, err := req.Decode(argAddr, structAt{argAddr, b[:]})
				return &a, err
			},
		})
		if d.Action != policy.Deny && d.Action != policy.Kill {
			continue
		}
		rule := "its default"
		if d.Rule != nil {
			rule = fmt.Sprintf("rule %q", d.Rule.Label())
		}
		does := "deny"
		if d.Action == policy.Kill {
			does = "kill QEMU on"
		}
		src := p.Source
		if src == "" {
			src = "in force"
		}
		return fmt.Errorf("the ioctl policy %s would %s QEMU's KVM_SET_GUEST_DEBUG (control %#x, %s), which QEMU's gdbstub needs under KVM for the breakpoints and steps of an action inside the guest: allow KVM_SET_GUEST_DEBUG on vcpu fds to act in this VM", src, does, c.control, rule)
	}
	return nil
}

// structAt is QEMU's memory as the policy's decoder reads it: b at addr.
type structAt struct {
	addr uint64
	b    []byte
}

func (s structAt) ReadAt(p []byte, addr uint64) error {
	if addr < s.addr || addr-s.addr+uint64(len(p)) > uint64(len(s.b)) {
		return fmt.Errorf("read %#x+%d outside the struct", addr, len(p))
	}
	copy(p, s.b[addr-s.addr:])
	return nil
}

// guestDebugProbe asks this host's KVM once, with a throw-away guest of
// its own (kvmprobe.GuestDebug), whether it stops a vCPU at a hardware
// breakpoint. Some KVMs do not: a KVM nested under QEMU's TCG, as in
// kvmscope's lab, runs past every breakpoint of QEMU's gdbstub, and an
// action would wait its whole bound for nothing.
type guestDebugProbe struct {
	once sync.Once
	err  error
}

// refused is why an action cannot work here, or nil. A probe that could
// not run (no /dev/kvm in this process) refuses nothing: the action then
// finds out at its breakpoint, within its bound.
func (p *guestDebugProbe) refused(log zerolog.Logger) error {
	p.once.Do(func() {
		p.err = kvmprobe.GuestDebug()
		if p.err != nil && !errors.Is(p.err, kvmprobe.ErrNoStop) {
			log.Warn().Err(p.err).Msg("KVM guest-debug probe did not run; actions inside the guest try anyway")
		}
	})
	if errors.Is(p.err, kvmprobe.ErrNoStop) {
		return fmt.Errorf("actions inside the guest need QEMU's gdbstub to stop vCPUs at hardware breakpoints, and %v (KVM nested under QEMU's TCG, as in kvmscope's lab, does not: docs/limitations.md)", p.err)
	}
	return nil
}
