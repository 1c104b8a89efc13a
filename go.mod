module github.com/kvmscope/kvmscope

go 1.26.8
