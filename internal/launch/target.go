package launch

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/session"
	"github.com/kvmscope/kvmscope/tracer"
	"github.com/kvmscope/kvmscope/tracer/handoff"
	"github.com/kvmscope/kvmscope/tracer/policy"
	"github.com/rs/zerolog"
)

// runTarget is the tracer side of a VM launched under the tracer, as the
// analysis process holds it: the session.Machine its Session reads through
// (the current memory source, pause) and the api.Target that describes
// it. Whatever only the tracer can do goes to the keeper through t.
type runTarget struct {
	t        *handoff.Client
	qa       QEMUArgs
	log      zerolog.Logger
	name     string
	writable bool
	live     *guestmem.Live
	qmpPath  string
	tcg      *guestmem.TCG // set once QMP answers (its monitor serves KVM's actions too)
	tcgReady chan struct{}
	// policy is the ioctl policy the tracer enforces on QEMU (nil: none),
	// which actions under KVM check KVM_SET_GUEST_DEBUG against.
	policy     *policy.Policy
	debugProbe guestDebugProbe
}

func newRunTarget(t *handoff.Client, qa QEMUArgs, writable bool, qmpPath string, pol *policy.Policy, log zerolog.Logger) *runTarget {
	return &runTarget{t: t, qa: qa, log: log, writable: writable, live: guestmem.NewLive(t, writable), qmpPath: qmpPath, policy: pol, tcgReady: make(chan struct{})}
}

// connectQMP connects to the private QMP socket when QEMU has one.
func (r *runTarget) connectQMP(done <-chan struct{}) {
	if r.qmpPath == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	go func() {
		select {
		case <-done:
			cancel()
		case <-ctx.Done():
		}
	}()
	q, err := guestmem.DialQMP(ctx, r.qmpPath)
	if err != nil {
		r.log.Warn().Err(err).Msg("private QMP socket")
		return
	}
	r.tcg = guestmem.NewTCG(q, r.t.QEMUPid, r.writable)
	close(r.tcgReady)
}

// Commands is QEMU's private QMP socket, once it answers: under KVM
// (with --allow-write, launch.go adds it) actions inside the guest open
// QEMU's gdbstub through it (session.MonitorMachine).
func (r *runTarget) Commands() guestmem.Commands {
	select {
	case <-r.tcgReady:
		return r.tcg.Commands()
	default:
		return nil
	}
}

// GuestDebugRefused says whether the ioctl policy would refuse what
// QEMU's gdbstub asks of KVM for an action, or this host's KVM would not
// stop a vCPU at its breakpoints (guestdebug.go).
func (r *runTarget) GuestDebugRefused() error {
	if err := guestDebugRefused(r.policy); err != nil {
		return err
	}
	return r.debugProbe.refused(r.log)
}

// kvm reports whether QEMU runs the guest on KVM.
func (r *runTarget) kvm() bool { return r.t.Pid() != 0 }

// Source is KVM's source once QEMU has created its VM, else TCG's once
// QEMU answers on the private QMP socket.
func (r *runTarget) Source() (guestmem.Source, error) {
	if r.kvm() {
		return r.live, nil
	}
	select {
	case <-r.tcgReady:
		return r.tcg, nil
	default:
		return nil, errNotReady
	}
}

// Pause stops QEMU (tracer.Tracer.Pause, in the keeper).
func (r *runTarget) Pause(ctx context.Context) (func(), error) { return r.t.Pause(ctx) }

func (r *runTarget) Describe() api.VM {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r.t.Refresh(ctx)
	out := api.VM{Name: r.name, TracerPid: r.t.KeeperPid(), AnalysisPid: os.Getpid(), Accel: "tcg", Writable: r.writable, VCPUs: []api.VCPUInfo{}, Regions: []api.RegionOut{}}
	vm := r.t
	if r.kvm() {
		out.Accel = "kvm"
		out.Pid = vm.Pid()
		for _, v := range vm.VCPUs() {
			out.VCPUs = append(out.VCPUs, api.VCPUInfo{ID: v.ID, TID: v.TID})
		}
		mapped, _ := r.live.MemfdRegions()
		isMemfd := func(m tracer.Memslot) bool {
			for _, rg := range mapped {
				if m.AddressSpace() == 0 && rg.GPA == m.GPA && rg.Size == m.Size {
					return true
				}
			}
			return false
		}
		for _, m := range vm.Memslots() {
			out.Memslots = append(out.Memslots, api.Memslot{Slot: m.Slot, AddressSpace: m.AddressSpace(), GPA: api.Hex64(m.GPA), Size: api.Hex64(m.Size), HVA: api.Hex64(m.HVA), Flags: m.Flags, ReadOnly: m.ReadOnly, DirtyLog: m.DirtyLog, Memfd: isMemfd(m)})
		}
	} else {
		out.Pid = r.t.QEMUPid()
		if cpus, err := r.tcgCPUs(ctx); err == nil {
			for _, c := range cpus {
				out.VCPUs = append(out.VCPUs, api.VCPUInfo{ID: c.ID})
			}
		}
	}
	var regions []guestmem.Region
	if src, err := r.Source(); err == nil {
		regions = src.Regions()
	}
	for _, rg := range regions {
		out.Regions = append(out.Regions, api.RegionOut{GPA: api.Hex64(rg.GPA), Size: api.Hex64(rg.Size), ReadOnly: rg.ReadOnly, Name: rg.Name})
	}
	return out
}

var errNotReady = errors.New("the VM is not running yet (QEMU has created no VM and its QMP socket is not answering)")

// tcgCPUs are the vCPUs QMP lists.
func (r *runTarget) tcgCPUs(ctx context.Context) ([]guestmem.CPU, error) {
	src, err := r.Source()
	if err != nil {
		return nil, err
	}
	return src.CPUs(ctx)
}

var _ session.MonitorMachine = (*runTarget)(nil)
