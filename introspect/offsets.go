package introspect

import (
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"

	"github.com/cilium/ebpf/btf"
)

// ErrOffsetsMissing is wrapped when an operation needs an offset that was
// not found.
var ErrOffsetsMissing = errors.New("needed offset unknown")

// Offset is the byte offset of one member inside its kernel structure and
// where it came from.
type Offset struct {
	Value int64 `json:"value"`
	// Source is "btf" (the kernel's own type information) or "solved"
	// (found from constraints on the member's values, see docs/offsets.md);
	// empty when the offset is unknown.
	Source string `json:"source,omitempty"`
	// How says which BTF member or which constraint singled the offset out.
	How string `json:"how,omitempty"`
}

// Known reports whether the offset was found.
func (o Offset) Known() bool { return o.Source != "" }

// Offset sources.
const (
	SourceBTF    = "btf"
	SourceSolved = "solved"
)

// Offsets are the offsets of the kernel structure members that process and
// module listing need. Each field's `kernel` tag names the member as
// struct.member (dotted paths go through nested or anonymous members,
// "|" separates names the member had in other kernel versions); `json` is
// the name used in every export.
type Offsets struct {
	TaskTasks      Offset `json:"task_struct.tasks" kernel:"task_struct.tasks"`
	TaskComm       Offset `json:"task_struct.comm" kernel:"task_struct.comm"`
	TaskPID        Offset `json:"task_struct.pid" kernel:"task_struct.pid"`
	TaskTGID       Offset `json:"task_struct.tgid" kernel:"task_struct.tgid"`
	TaskRealParent Offset `json:"task_struct.real_parent" kernel:"task_struct.real_parent"`
	TaskParent     Offset `json:"task_struct.parent" kernel:"task_struct.parent"`
	TaskMM         Offset `json:"task_struct.mm" kernel:"task_struct.mm"`
	TaskRealCred   Offset `json:"task_struct.real_cred" kernel:"task_struct.real_cred"`
	TaskCred       Offset `json:"task_struct.cred" kernel:"task_struct.cred"`
	TaskFlags      Offset `json:"task_struct.flags" kernel:"task_struct.flags"`
	TaskState      Offset `json:"task_struct.__state" kernel:"task_struct.__state|state"`
	TaskStartTime  Offset `json:"task_struct.start_time" kernel:"task_struct.start_time"`
	TaskSignal     Offset `json:"task_struct.signal" kernel:"task_struct.signal"`
	TaskThreadNode Offset `json:"task_struct.thread_node" kernel:"task_struct.thread_node"`
	SignalThreadHd Offset `json:"signal_struct.thread_head" kernel:"signal_struct.thread_head"`
	MMPgd          Offset `json:"mm_struct.pgd" kernel:"mm_struct.pgd"`
	MMArgStart     Offset `json:"mm_struct.arg_start" kernel:"mm_struct.arg_start"`
	MMArgEnd       Offset `json:"mm_struct.arg_end" kernel:"mm_struct.arg_end"`
	CredUID        Offset `json:"cred.uid" kernel:"cred.uid"`
	CredGID        Offset `json:"cred.gid" kernel:"cred.gid"`
	CredEUID       Offset `json:"cred.euid" kernel:"cred.euid"`
	CredEGID       Offset `json:"cred.egid" kernel:"cred.egid"`
	// SignalNrThreads comes from BTF only: by value it cannot be told
	// from sigcnt and live, which count the same threads. Without it
	// threads are counted on their list.
	SignalNrThreads Offset `json:"signal_struct.nr_threads" kernel:"signal_struct.nr_threads" solve:"-"`
	ModuleList      Offset `json:"module.list" kernel:"module.list"`
	ModuleName      Offset `json:"module.name" kernel:"module.name"`
	ModuleState     Offset `json:"module.state" kernel:"module.state"`
	ModuleBase      Offset `json:"module.base" kernel:"module.core_layout.base|module_core"`
	ModuleSize      Offset `json:"module.size" kernel:"module.core_layout.size|core_size"`
	// ModuleMemStride is, for kernels 6.4 and newer, the size of one
	// struct module_memory in module.mem[]; the module's size is then the
	// sum of its core (non-init) regions. Unknown for older kernels, whose
	// module has one core_layout.
	ModuleMemStride Offset `json:"module_memory.stride" kernel:"-"`
}

// Member is one entry of Offsets.Members.
type Member struct {
	// Name is struct.member, as the kernel names it.
	Name string
	Offset
}

// Members lists every offset with its kernel name, in field order.
func (o *Offsets) Members() []Member {
	v := reflect.ValueOf(o).Elem()
	t := v.Type()
	out := make([]Member, 0, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		out = append(out, Member{Name: t.Field(i).Tag.Get("json"), Offset: v.Field(i).Interface().(Offset)})
	}
	return out
}

// UnsolvedError lists the members whose offsets could not be found, each
// with the reason (for a solved offset: the constraint that failed or the
// candidates it could not choose between). The Offsets returned with it
// hold every member that was found.
type UnsolvedError struct {
	Members map[string]string
	// cause is the error of a step every later one needed, if any.
	cause error
}

// Unwrap returns the error that stopped the solver early, so
// errors.Is(err, ErrAmbiguous) tells a choice the constraints could not
// make.
func (e *UnsolvedError) Unwrap() error { return e.cause }

func (e *UnsolvedError) Error() string {
	names := make([]string, 0, len(e.Members))
	for n := range e.Members {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	fmt.Fprintf(&b, "offsets: %d member(s) not found:", len(names))
	for _, n := range names {
		fmt.Fprintf(&b, "\n  %s: %s", n, e.Members[n])
	}
	return b.String()
}

// unsolved records why member could not be found.
func (e *UnsolvedError) add(member string, err error) {
	if e.Members == nil {
		e.Members = make(map[string]string)
	}
	e.Members[member] = err.Error()
}

func (e *UnsolvedError) orNil() error {
	if len(e.Members) == 0 {
		return nil
	}
	return e
}

// ErrAmbiguous is wrapped when constraints leave more than one candidate.
var ErrAmbiguous = errors.New("constraints do not single out one offset")

// FindOffsets returns the offsets of the members kvmscope needs: from the
// kernel's BTF when it has one, else solved from guest memory (see
// SolveOffsets). Members BTF does not describe are solved. On a partial
// result it returns the offsets found and an *UnsolvedError.
func FindOffsets(k *Kernel) (*Offsets, error) {
	if k.BTF == nil {
		return SolveOffsets(k)
	}
	off, btfErr := offsetsFromBTF(k)
	if btfErr == nil {
		return off, nil
	}
	var ue *UnsolvedError
	if errors.As(btfErr, &ue) && onlyOptional(ue) {
		return off, nil
	}
	// Fill the gaps by solving; keep BTF's answers where it had them.
	solved, err := SolveOffsets(k)
	if solved == nil {
		return off, btfErr
	}
	miss := &UnsolvedError{}
	dst := reflect.ValueOf(off).Elem()
	src := reflect.ValueOf(solved).Elem()
	for i := 0; i < dst.NumField(); i++ {
		if dst.Field(i).Interface().(Offset).Known() {
			continue
		}
		s := src.Field(i).Interface().(Offset)
		if s.Known() {
			dst.Field(i).Set(reflect.ValueOf(s))
			continue
		}
		if dst.Type().Field(i).Tag.Get("solve") == "-" {
			continue // optional, BTF only
		}
		name := dst.Type().Field(i).Tag.Get("json")
		why := "not in BTF and not solved"
		var ue *UnsolvedError
		if errors.As(err, &ue) && ue.Members[name] != "" {
			why = "not in BTF; " + ue.Members[name]
		}
		miss.Members = setDefault(miss.Members, name, why)
	}
	return off, miss.orNil()
}

// onlyOptional reports whether every member in e is one the solver
// never solves (a BTF-only convenience).
func onlyOptional(e *UnsolvedError) bool {
	t := reflect.TypeOf(Offsets{})
	for i := 0; i < t.NumField(); i++ {
		if t.Field(i).Tag.Get("solve") != "-" && e.Members[t.Field(i).Tag.Get("json")] != "" {
			return false
		}
	}
	return true
}

func setDefault(m map[string]string, k, v string) map[string]string {
	if m == nil {
		m = make(map[string]string)
	}
	m[k] = v
	return m
}

// offsetsFromBTF reads every member's offset from the kernel's BTF. The
// kernel tag may list alternatives separated by "|" (members renamed
// between kernel versions: task_struct.state became __state in 5.14,
// module.core_layout became module.mem[] in 6.4).
func offsetsFromBTF(k *Kernel) (*Offsets, error) {
	off := &Offsets{}
	miss := &UnsolvedError{}
	v := reflect.ValueOf(off).Elem()
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		tag := t.Field(i).Tag.Get("kernel")
		name := t.Field(i).Tag.Get("json")
		if tag == "-" {
			continue
		}
		strct, members, _ := strings.Cut(tag, ".")
		var lastErr error
		for _, m := range strings.Split(members, "|") {
			o, err := k.MemberOffset(strct, m)
			if err != nil {
				lastErr = err
				continue
			}
			v.Field(i).Set(reflect.ValueOf(Offset{Value: int64(o), Source: SourceBTF, How: strct + "." + m}))
			lastErr = nil
			break
		}
		if lastErr != nil {
			miss.add(name, fmt.Errorf("BTF: %w", lastErr))
		}
	}
	// module.mem[] (6.4+) replaced core_layout: the text region is
	// mem[MOD_TEXT = 0]; the size /proc/modules shows is the sum over the
	// core regions, which needs the element size.
	if !off.ModuleBase.Known() {
		if err := moduleMemFromBTF(k, off); err == nil {
			delete(miss.Members, "module.base")
			delete(miss.Members, "module.size")
		}
	}
	return off, miss.orNil()
}

func moduleMemFromBTF(k *Kernel, off *Offsets) error {
	mem, err := k.MemberOffset("module", "mem")
	if err != nil {
		return err
	}
	base, err := k.MemberOffset("module_memory", "base")
	if err != nil {
		return err
	}
	size, err := k.MemberOffset("module_memory", "size")
	if err != nil {
		return err
	}
	stride, err := k.btfStructSize("module_memory")
	if err != nil {
		return err
	}
	off.ModuleBase = Offset{Value: int64(mem + base), Source: SourceBTF, How: "module.mem[MOD_TEXT].base"}
	off.ModuleSize = Offset{Value: int64(mem + size), Source: SourceBTF, How: "module.mem[MOD_TEXT].size"}
	off.ModuleMemStride = Offset{Value: int64(stride), Source: SourceBTF, How: "sizeof(struct module_memory)"}
	return nil
}

// btfStructSize returns the size of struct name from the kernel's BTF.
func (k *Kernel) btfStructSize(name string) (uint32, error) {
	if k.BTF == nil {
		return 0, errors.New("kernel has no BTF")
	}
	var s *btf.Struct
	if err := k.BTF.TypeByName(name, &s); err != nil {
		return 0, fmt.Errorf("BTF: struct %s: %w", name, err)
	}
	return s.Size, nil
}
