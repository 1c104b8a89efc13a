package launch

import (
	"reflect"
	"testing"
)

func TestParseQEMUArgs(t *testing.T) {
	cases := []struct {
		name string
		args []string
		want QEMUArgs
	}{
		{"version", []string{"-version"}, QEMUArgs{Probe: true, Accels: []string{"tcg"}}},
		{"double dash help", []string{"--help"}, QEMUArgs{Probe: true, Accels: []string{"tcg"}}},
		{"device help", []string{"-device", "help"}, QEMUArgs{Probe: true, Accels: []string{"tcg"}}},
		{"machine help", []string{"-M", "?"}, QEMUArgs{Probe: true, Accels: []string{"tcg"}}},
		// libvirt 9.0's capability probe (see docs/host-facts).
		{"libvirt probe", []string{"-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg",
			"-qmp", "unix:/var/lib/libvirt/qemu/qmp-X/qmp.monitor,server=on,wait=off", "-pidfile", "/x/qmp.pid", "-daemonize"},
			QEMUArgs{Probe: true, Daemonize: true, Accels: []string{"kvm", "tcg"}}},
		// A libvirt domain: -name guest=NAME,debug-threads=on, -accel tcg.
		{"libvirt domain", []string{"-name", "guest=web-1,debug-threads=on", "-S", "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off",
			"-accel", "tcg", "-m", "512", "-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off"},
			QEMUArgs{Name: "web-1", Accels: []string{"tcg"}}},
		{"plain name and kvm", []string{"-name", "vm0", "-enable-kvm", "-machine", "q35,accel=kvm"}, QEMUArgs{Name: "vm0", Accels: []string{"kvm", "kvm"}}},
		{"escaped comma", []string{"-name", "guest=a,,b,debug-threads=on"}, QEMUArgs{Name: "a,b", Accels: []string{"tcg"}}},
		{"accel option", []string{"-accel", "kvm,kernel-irqchip=split", "-accel", "tcg"}, QEMUArgs{Accels: []string{"kvm", "tcg"}}},
		{"trailing option without value", []string{"-name"}, QEMUArgs{Accels: []string{"tcg"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := ParseQEMUArgs(tc.args); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ParseQEMUArgs(%q)\n got %+v\nwant %+v", tc.args, got, tc.want)
			}
		})
	}
}
