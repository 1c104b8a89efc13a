package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

// kvmDomainXML is a KVM domain running the tiny test guest (built from
// source by internal/testguest, its mode in cmdline) with qboot as its
// firmware, under emulator.
func kvmDomainXML(name, kernel, cmdline, firmware, emulator string, vcpus int) string {
	loader := ""
	if firmware != "" {
		loader = fmt.Sprintf("<loader readonly='yes' type='rom'>%s</loader>", firmware)
	}
	if cmdline != "" {
		cmdline = "<cmdline>" + cmdline + "</cmdline>"
	}
	return fmt.Sprintf(`<domain type='kvm'>
  <name>%s</name>
  <memory unit='MiB'>%d</memory>
  <vcpu>%d</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    %s
    <kernel>%s</kernel>
    %s
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>%s</emulator>
    <memballoon model='none'/>
  </devices>
</domain>
`, name, testguest.MemoryMiB, vcpus, loader, kernel, cmdline, emulator)
}

// TestLibvirtKVMDomain: the primary path, a domain of type kvm. kvmscope
// captures QEMU's vCPU fds and memslots while QEMU runs as libvirt-qemu in
// libvirt's private /dev, and reads the guest's memory and registers.
func TestLibvirtKVMDomain(t *testing.T) {
	testenv.Require(t, testenv.QEMU, testenv.KVM)
	needLibvirt(t)
	elf, err := testguest.Build()
	if err != nil {
		t.Fatalf("build the tiny guest: %v", err)
	}
	dir := filepath.Join(binDir, "kvm-guest")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	kernel := filepath.Join(dir, "tinyguest.elf")
	copyFile(t, elf, kernel)
	cfg, err := launch.LoadConfig(launch.DefaultConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	const vcpus = 2
	name := fmt.Sprintf("kvmscope-test-kvm-%d", os.Getpid())
	xmlPath := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlPath, []byte(kvmDomainXML(name, kernel, "", testguest.Firmware(), wrapperBin, vcpus)), 0o644); err != nil {
		t.Fatal(err)
	}
	mustVirsh(t, "define", xmlPath)
	t.Cleanup(func() {
		virsh(t, "destroy", name)
		virsh(t, "undefine", name)
		os.Remove(filepath.Join(cfg.SocketDir, name+".log"))
		domainLog := "/var/log/libvirt/qemu/" + name + ".log"
		if t.Failed() {
			b, _ := os.ReadFile(domainLog)
			t.Logf("domain log:\n%s", b)
		}
		os.Remove(domainLog)
	})
	mustVirsh(t, "start", name)
	sock := filepath.Join(cfg.SocketDir, name+".sock")
	waitFile(t, sock, 30*time.Second)
	c := api.NewClient(sock)
	read := func(gpa uint64, n int) ([]byte, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		q := url.Values{"gpa": {fmt.Sprintf("%#x", gpa)}, "len": {fmt.Sprint(n)}}
		return c.GetRaw(ctx, "/v1/memory?"+q.Encode())
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		b, err := read(testguest.ReadyGPA, 8)
		if err == nil && binary.LittleEndian.Uint64(b) == testguest.ReadyValue {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the tiny guest's ready marker: %x, %v", b, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	vm := waitVCPUs(t, sock, vcpus)
	if vm.Accel != "kvm" || len(vm.Memslots) == 0 {
		t.Fatalf("vm = %+v; want KVM with memslots", vm)
	}
	for i, v := range vm.VCPUs {
		if v.ID != i || v.TID == 0 {
			t.Errorf("vCPU %d = %+v; want its id and QEMU thread", i, v)
		}
	}
	for i := 0; i < testguest.PatternPages; i++ {
		b, err := read(testguest.PatternGPA+uint64(i)*testguest.PageSize, testguest.PageSize)
		if err != nil || !bytes.Equal(b, testguest.PatternFor(i)) {
			t.Fatalf("pattern page %d: %v", i, err)
		}
	}
	r := cli(t, "vcpus", "--vm", name, "--json")
	if r.code != 0 || !strings.Contains(r.stdout, fmt.Sprintf(`"cr3": "%#x"`, testguest.PML4GPA)) {
		t.Errorf("kvmscope vcpus --vm %s: code %d\n%s%s", name, r.code, r.stdout, r.stderr)
	}
	if m := getMetrics(t, sock); metricValue(t, m, "kvmscope_memslots") < 1 || metricValue(t, m, "kvmscope_vcpus") != vcpus {
		t.Errorf("/metrics: memslots %v, vcpus %v", metricValue(t, m, "kvmscope_memslots"), metricValue(t, m, "kvmscope_vcpus"))
	}
	mustVirsh(t, "destroy", name)
	if alive(vm.Pid) {
		time.Sleep(time.Second)
		if alive(vm.Pid) {
			t.Errorf("QEMU %d alive after virsh destroy", vm.Pid)
		}
	}
}
