#compdef taskctl

_taskctl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _TASKCTL_COMPLETE=complete_zsh taskctl)
}

if [[ ${funcstack[1]} == _taskctl ]]; then
  _taskctl_completion "$@"  # autoloaded from $fpath by compinit: this is the first TAB
else
  compdef _taskctl_completion taskctl  # sourced
fi

