package guestmem

import "testing"

// Output of QEMU 7.2's `info registers -a` for a 64-bit Linux guest (two
// vCPUs, trimmed of FPU/SSE lines), as returned through QMP.
const infoRegisters = "\r\nCPU#0\r\nRAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000001 RDX=0000000000010b0e\r\n" +
	"RSI=0000000000000083 RDI=0000000000010b0c RBP=0000000000000000 RSP=ffffffff9e803e98\r\n" +
	"RIP=ffffffff9d817a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n" +
	"ES =0000 0000000000000000 00000000 00000000\r\n" +
	"CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\r\n" +
	"SS =0018 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n" +
	"DS =0000 0000000000000000 00000000 00000000\r\n" +
	"FS =0000 0000000000000000 00000000 00000000\r\n" +
	"GS =0000 ffff8b7d1f600000 00000000 00000000\r\n" +
	"GDT=     fffffe0000001000 0000007f\r\n" +
	"IDT=     fffffe0000000000 00000fff\r\n" +
	"CR0=80050033 CR2=0000000000000000 CR3=000000000f010000 CR4=000006b0\r\n" +
	"EFER=0000000000000d01\r\n" +
	"CPU#1\r\nRIP=0000000000000000 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n" +
	"CS =f000 00000000000f0000 0000ffff 00009b00\r\n" +
	"CR0=60000010 CR2=0000000000000000 CR3=0000000000000000 CR4=00000000\r\n" +
	"EFER=0000000000000000\r\n"

func TestParseInfoRegisters(t *testing.T) {
	cpus, err := ParseInfoRegisters(infoRegisters)
	if err != nil {
		t.Fatal(err)
	}
	if len(cpus) != 2 {
		t.Fatalf("got %d CPUs, want 2: %+v", len(cpus), cpus)
	}
	c := cpus[0]
	if c.ID != 0 || c.RIP != 0xffffffff9d817a0b || c.CR3 != 0xf010000 || c.CR0 != 0x80050033 || c.EFER != 0xd01 ||
		c.GSBase != 0xffff8b7d1f600000 || c.IDTBase != 0xfffffe0000000000 || c.IDTLimit != 0xfff || !c.CSL || c.Mode() != "long" || c.Paging() != 4 || c.RSP != 0xffffffff9e803e98 {
		t.Errorf("CPU 0 = %+v", c)
	}
	if c := cpus[1]; c.ID != 1 || c.Mode() != "real" || c.CSBase != 0xf0000 {
		t.Errorf("CPU 1 = %+v (mode %s)", c, c.Mode())
	}
}

func FuzzParseInfoRegisters(f *testing.F) {
	f.Add(infoRegisters)
	f.Add("CPU#\r\n")
	f.Add("CS =zz")
	f.Fuzz(func(t *testing.T, s string) {
		ParseInfoRegisters(s)
	})
}
