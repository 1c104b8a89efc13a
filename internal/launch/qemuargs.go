package launch

import (
	"strings"
)

// QEMUArgs is what kvmscope needs to know from QEMU's command line. It never
// changes how QEMU parses it.
type QEMUArgs struct {
	Name      string // -name guest=NAME or -name NAME
	Daemonize bool
	// Probe is set for runs that print something and exit, or that run no
	// guest: -version, -help, "help" listings, and libvirt's capability
	// probe with "-machine none". They pass straight through.
	Probe bool
	// Accels lists the accelerators QEMU may use, in its order of
	// preference (-accel, -machine accel=, or QEMU's default: tcg).
	Accels []string
}

// ParseQEMUArgs reads QEMU's arguments (argv without argv[0]). QEMU accepts
// "-opt" and "--opt", with the value as the next argument.
func ParseQEMUArgs(args []string) QEMUArgs {
	var q QEMUArgs
	for i := 0; i < len(args); i++ {
		a := args[i]
		if strings.HasPrefix(a, "--") {
			a = a[1:]
		}
		val := ""
		if i+1 < len(args) {
			val = args[i+1]
		}
		switch a {
		case "-version", "-help", "-h":
			q.Probe = true
		case "-daemonize":
			q.Daemonize = true
		case "-name":
			q.Name = optValue(val, "guest")
			i++
		case "-accel":
			q.Accels = append(q.Accels, optValue(val, "accel"))
			i++
		case "-enable-kvm":
			q.Accels = append(q.Accels, "kvm")
		case "-machine", "-M":
			if acc := optKey(val, "accel"); acc != "" {
				q.Accels = append(q.Accels, strings.Split(acc, ":")...)
			}
			switch optValue(val, "type") {
			case "help", "?", "none":
				// "none" is libvirt's capability probe: QEMU answers
				// QMP queries and runs no guest.
				q.Probe = true
			}
			i++
		default:
			// "-cpu help", "-device help" and the like list and exit.
			if strings.HasPrefix(a, "-") && (val == "help" || val == "?") {
				q.Probe = true
			}
		}
	}
	if len(q.Accels) == 0 {
		q.Accels = []string{"tcg"}
	}
	return q
}

// optValue returns the implied first value of a QEMU option string
// ("NAME,k=v" or "guest=NAME,k=v"), or the value of key.
func optValue(s, key string) string {
	parts := splitOpts(s)
	if len(parts) == 0 {
		return ""
	}
	if v := optKey(s, key); v != "" {
		return v
	}
	if !strings.Contains(parts[0], "=") {
		return parts[0]
	}
	return ""
}

// optKey returns the value of key=VALUE in a QEMU option string.
func optKey(s, key string) string {
	for _, p := range splitOpts(s) {
		if k, v, ok := strings.Cut(p, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// splitOpts splits on commas; QEMU escapes a literal comma as ",,".
func splitOpts(s string) []string {
	var out []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			out = append(out, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	return append(out, cur.String())
}

// MayUseTCG reports whether QEMU may end up running without KVM.
func (q QEMUArgs) MayUseTCG() bool {
	for _, a := range q.Accels {
		if a == "tcg" {
			return true
		}
	}
	return false
}

// MayUseKVM reports whether QEMU may use KVM.
func (q QEMUArgs) MayUseKVM() bool {
	for _, a := range q.Accels {
		if a == "kvm" {
			return true
		}
	}
	return false
}
